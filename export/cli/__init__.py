"""The offline half's commands, one module per group (data, train, evaluate, export); attnrec/cli.py dispatches.

Each module's COMMANDS maps a command name to the function that fills its parser. Modules import
only the standard library at the top: what a command needs (torch among it) is imported when it runs.
"""
