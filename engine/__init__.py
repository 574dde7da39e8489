"""attnrec's online half. Never imports torch (a test checks it)."""
