"""A plugin the browser tests load into a server subprocess
(``--plugin tests.web_plugins:NoShouting``)."""

from __future__ import annotations

import chatkit


class NoShouting:
    """Refuses messages in capitals: the sender gets ``error rejected``."""

    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str:
        if text.isupper():
            raise chatkit.Veto("please don't shout")
        return text
