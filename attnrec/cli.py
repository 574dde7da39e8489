from attnrec.export.cli import main

__all__ = ["main"]
