"""The chat server of the original program, now chatkit's.

``python examples/chat_server.py [--port 12345] [--plugin module:attr ...]``
takes the same options as ``python -m chatkit.server`` (``--help``).
"""

from __future__ import annotations

import sys

from chatkit.server.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
