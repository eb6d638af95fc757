"""An MCP server for the tests, written with the SDK's own server API (mcp.server.mcpserver.MCPServer).

    python testsupport_mcp_server.py stdio                  # on stdin/stdout
    python testsupport_mcp_server.py http PORT              # streamable HTTP on 127.0.0.1:PORT/mcp

Its tools: echo (text back, and the value of $MCP_TEST_TOKEN when asked), add (structured output), fail (an
error result), slow (sleeps SECONDS, writing its pid to a file first), picture (text and an image block), crash
(the server exits mid-call). With MCP_TEST_FAIL_START=1 it writes a line to stderr and exits before serving.
"""
import os
import sys
import time


PICTURE = b"\x89PNG\r\n\x1a\n fake image bytes "  # what the picture tool returns, its format after it


def main():
    """Serve as argv says (the SDK is imported only here: test discovery imports this file too)."""
    if os.environ.get("MCP_TEST_FAIL_START"):
        print("fake server: cannot open its database", file=sys.stderr, flush=True)
        sys.exit(3)
    from mcp.server.mcpserver import MCPServer
    app = MCPServer("stigmer-test-server", version="1.2.3")

    @app.tool(description="Say TEXT back; with token=true also the server's MCP_TEST_TOKEN.")
    def echo(text: str, token: bool = False) -> str:
        return f"echo: {text}" + (f" token={os.environ.get('MCP_TEST_TOKEN', '')}" if token else "")

    @app.tool(description="Add two integers.")
    def add(a: int, b: int) -> dict:
        return {"sum": a + b}

    @app.tool(description="Always fails.")
    def fail(why: str) -> str:
        raise ValueError(f"failed on purpose: {why}")

    @app.tool(description="Sleep SECONDS, after writing the server's pid to PIDFILE.")
    def slow(seconds: float, pidfile: str = "") -> str:
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(seconds)
        return f"slept {seconds}"

    @app.tool(description="A picture: FORMAT png (shown to the model) or bmp (not a type the APIs take).")
    def picture(format: str = "png"):
        from mcp.server.mcpserver import Image
        return ["here it is", Image(data=PICTURE + format.encode(), format=format)]

    @app.tool(description="Exit the server in the middle of the call.")
    def crash() -> str:
        os._exit(7)

    if sys.argv[1:2] == ["http"]:
        app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        app.run("stdio")


if __name__ == "__main__":
    main()
