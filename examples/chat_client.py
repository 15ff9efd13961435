"""The chat client of the original program, now chatkit's.

``python examples/chat_client.py [--port 12345] [--name alice]`` takes the
same options as ``python -m chatkit.client`` (``--help``).
"""

from __future__ import annotations

import sys

from chatkit.client.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
