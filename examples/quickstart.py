"""Run a chatkit server and two clients in one trio program, and print what
they say to each other. ``python examples/quickstart.py``"""

from __future__ import annotations

import trio

import chatkit


class Shout:
    """A server plugin: rewrites messages ending in '!' to upper case."""

    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str | None:
        return text.upper() if text.endswith("!") else None


async def main() -> None:
    async with chatkit.open_server(port=0, plugins=[Shout()]) as server:
        print(f"Server started on 127.0.0.1:{server.port}")
        async with (
            chatkit.open_client("127.0.0.1", server.port, name="alice") as alice,
            chatkit.open_client("127.0.0.1", server.port, name="bob") as bob,
        ):
            await alice.say("hello, bob")
            await bob.say("hi alice, welcome!")
            print("in the lobby:", ", ".join(await alice.who()))
            for message in await alice.history("lobby"):
                print(f"{message.sender}: {message.text}")
    print("Server has shut down.")


if __name__ == "__main__":
    trio.run(main)
