"""Model providers: the Model seam, model-name resolution, default models and error messages.

    import models
    provider, name = models.resolve("claude-sonnet-4-5")   # ("anthropic", "claude-sonnet-4-5")
    model = models.make_model("anthropic/claude-sonnet-4-5")
    reply = model.turn(system_text, tools, [{"role": "user", "text": "hi"}],
                       on_text=print, cancelled=threading.Event())
    reply.text, reply.tool_calls, reply.stop, reply.usage

A model speaks provider-neutral messages: {"role": "user", "text": str},
{"role": "assistant", "text": str, "tool_calls": [ToolUse, ...]} and
{"role": "tool_results", "results": [{"id": str, "output": str, "is_error": bool}, ...]},
and answers each turn with a `Reply`. API failures raise `ModelError` (a code and a
message a person can act on); a turn cancelled mid-stream raises `Cancelled`.

Provider SDKs are imported lazily, when a model is made or preloaded: importing this
module is cheap, so the CLI can resolve names and pick keys without paying for an SDK
import. This module also loads the project's secrets.py, once, for everyone
(`project_secrets`).
"""
import importlib
import importlib.util
import os
import re
import sys
import threading
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
FALLBACK_MODEL = "claude-sonnet-4-5"  # when the installed SDK lists no Sonnet
PROVIDERS = ("anthropic",)  # the providers a model name may start with: "anthropic/claude-..."
MAX_OUTPUT_TOKENS = 16000  # max_tokens per model request
STREAM_RETRIES = 2  # extra attempts when the connection drops in the middle of a streamed reply
TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11")  # the SDK's HTTP stack, across versions

STOP_DONE = "done"  # the model finished its answer
STOP_TOOL_USE = "tool_use"  # the model wants its tool calls run
STOP_MAX_TOKENS = "max_tokens"  # cut off by the output limit (tool_calls, if any, are incomplete)
STOP_REFUSAL = "refusal"  # the model declined the task
STOP_CONTEXT = "context_window"  # the conversation no longer fits the context window
STOP_PAUSE = "pause"  # the provider paused a long turn (Anthropic pause_turn): send it back to continue

ToolUse = namedtuple("ToolUse", "id name input")  # input: a dict, or {"__malformed__": why} when not JSON
Usage = namedtuple("Usage", "input output cache_read cache_write")  # tokens of one turn
Reply = namedtuple("Reply", "text tool_calls stop usage")  # one turn's answer; stop is a STOP_* kind


class ModelError(Exception):
    """A model API failure: .code ("auth", "rate_limit", "context_window", ...) and .message for a person."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Cancelled(Exception):
    """The turn was cancelled while the model was answering."""


def _project_module(name, alias):
    """Import the project's NAME.py from beside this file, even where a standard-library
    module of the same name comes first on sys.path (the installed console script)."""
    mine = os.path.realpath(os.path.join(HERE, name + ".py"))
    found = importlib.util.find_spec(name)
    if found is not None and found.origin and os.path.realpath(found.origin) == mine:
        return importlib.import_module(name)  # ours wins on sys.path: one module, one set of classes
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.spec_from_file_location(alias, mine)
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


def project_secrets():
    """The project's secrets.py (loaded on first use: list, logs and status never need it)."""
    return _project_module("secrets", "stigmer_secrets")


def model_key_vars():
    """Every provider key variable: hidden from the agent's shell, kept from the daemon, redacted."""
    return tuple(var for p in project_secrets().PROVIDERS.values() for var in (p.env_var, *p.alt_env_vars))


def default_model(provider="anthropic"):
    """The newest Sonnet in the installed SDK's model list, read from its source without importing it."""
    found = importlib.util.find_spec("anthropic")
    try:
        with open(os.path.join(os.path.dirname(found.origin), "types", "model.py")) as f:
            names = re.findall(r'"(claude-sonnet-[0-9][0-9a-z-]*)"', f.read())
    except (OSError, AttributeError, TypeError):
        names = []
    undated = [n for n in names if not re.search(r"-\d{8}$", n)]
    return (undated or names or [FALLBACK_MODEL])[0]


def resolve(name):
    """(provider, model) for a model name: "anthropic/claude-x", a bare "claude-x", or "" for the default."""
    name = (name or "").strip()
    if not name:
        return "anthropic", default_model()
    provider, slash, model = name.partition("/")
    if slash and provider in PROVIDERS and model:
        return provider, model
    if not slash and name.startswith("claude-"):
        return "anthropic", name
    raise ModelError("model", f"the model name {name!r} is not one this runner knows: give provider/model "
                              f"(providers: {', '.join(PROVIDERS)}), a bare Claude name such as {FALLBACK_MODEL}, "
                              f"or nothing for the default")


def make_model(name):
    """The model object for NAME (see resolve); its SDK is imported on first use."""
    _, model = resolve(name)  # every name resolves to anthropic for now
    return AnthropicModel(model)


def preload(name=""):
    """Import NAME's provider SDK and make its client now: it takes seconds, better spent before the first turn.
    A name that does not resolve loads nothing (make_model reports it)."""
    try:
        resolve(name)
    except ModelError:
        return
    _shared_anthropic()


ANTHROPIC_SETTINGS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")  # what the SDK reads
_shared = {}
_shared_lock = threading.Lock()


def _shared_anthropic():
    """One anthropic client per process and settings (thread-safe). The SDK reads ANTHROPIC_API_KEY,
    ANTHROPIC_AUTH_TOKEN and ANTHROPIC_BASE_URL itself; a client is kept per their values, so that a
    changed setting never reaches a stale server."""
    settings = ("anthropic",) + tuple(os.environ.get(v) for v in ANTHROPIC_SETTINGS)
    with _shared_lock:
        if settings not in _shared:
            import anthropic
            _shared[settings] = anthropic.Anthropic()
        return _shared[settings]


def anthropic_error(exc):
    """(code, human message) for an anthropic SDK error, per class."""
    import anthropic
    if isinstance(exc, anthropic.AuthenticationError):
        return "auth", "the model API rejected the key (401): fix ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) and run again"
    if isinstance(exc, anthropic.PermissionDeniedError):
        return "permission", "the model API refused access (403): the key lacks permission for this model or organization"
    if isinstance(exc, anthropic.RateLimitError):
        return "rate_limit", "rate limited by the model API (429) after retries: wait a minute and run again"
    if isinstance(exc, anthropic.APIStatusError) and exc.status_code == 529:
        return "overloaded", "the model API is overloaded (529) after retries: try again shortly"
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout", "the model API timed out after retries"
    if isinstance(exc, anthropic.APIConnectionError):
        return "connection", f"could not reach the model API ({exc.request.url if exc.request else 'ANTHROPIC_BASE_URL'}): check your network or ANTHROPIC_BASE_URL"
    if isinstance(exc, anthropic.BadRequestError):
        text = str(exc)
        if "prompt is too long" in text or "context window" in text or "too many tokens" in text:
            return "context_window", "the conversation no longer fits the model's context window"
        return "bad_request", f"the model API refused the request (400): {getattr(exc, 'message', text)}"
    if isinstance(exc, anthropic.APIStatusError):
        return "api_error", f"the model API failed ({exc.status_code}): {getattr(exc, 'message', exc)}"
    return "api_error", f"the model API failed: {exc}"


ANTHROPIC_STOPS = {"tool_use": STOP_TOOL_USE, "max_tokens": STOP_MAX_TOKENS, "refusal": STOP_REFUSAL,
                   "model_context_window_exceeded": STOP_CONTEXT, "pause_turn": STOP_PAUSE}  # else STOP_DONE


class AnthropicModel:
    """Claude through the anthropic SDK's streaming Messages API, with prompt caching."""

    provider = "anthropic"

    def __init__(self, model, client=None):
        self.model = model
        self.client = client  # an anthropic.Anthropic(); the process's shared one when None
        self._stream = None  # the stream being read, for close()

    def turn(self, system_text, tools, messages, on_text, cancelled, on_retry=None):
        """One streamed reply to the neutral MESSAGES. A reply whose connection breaks mid-way is asked for
        again, up to STREAM_RETRIES times, telling on_retry(message) each time."""
        request = {"model": self.model, "max_tokens": MAX_OUTPUT_TOKENS,
                   "system": [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}],
                   "tools": [dict(t) for t in tools], "messages": [self._message(m) for m in messages]}
        request["tools"][-1]["cache_control"] = {"type": "ephemeral"}
        request["messages"][-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}  # the latest turn only
        for attempt in range(STREAM_RETRIES + 1):
            try:
                return self._request(request, on_text, cancelled)
            except (ModelError, Cancelled):
                raise
            except Exception as exc:
                if cancelled.is_set():
                    raise Cancelled() from None
                if type(exc).__module__.split(".")[0] not in TRANSPORT_MODULES:
                    raise
                if attempt == STREAM_RETRIES:
                    raise ModelError("connection", f"the connection to the model API broke mid-reply {attempt + 1} "
                                                   f"times ({type(exc).__name__})") from None
                if on_retry:
                    on_retry(f"the model's reply broke off ({type(exc).__name__}: {exc}); asking again")

    def close(self):
        """Abort the stream being read (cancel, from another thread)."""
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing from another thread may race the reader; the cancel flag is what counts
                pass

    @staticmethod
    def _message(message):
        """One neutral message as Messages API content (assistant blocks keyed as the SDK dumps them)."""
        if message["role"] == "user":
            return {"role": "user", "content": [{"type": "text", "text": message["text"]}]}
        if message["role"] == "tool_results":
            return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r["id"],
                                                 "is_error": r["is_error"], "content": r["output"]}
                                                for r in message["results"]]}
        content = [{"text": message["text"], "type": "text"}] if message["text"] else []
        content += [{"id": c.id, "input": c.input, "name": c.name, "type": "tool_use"} for c in message["tool_calls"]]
        return {"role": "assistant", "content": content}

    def _request(self, request, on_text, cancelled):
        """One streamed request; returns its Reply."""
        import anthropic
        try:
            with (self.client or _shared_anthropic()).messages.stream(**request) as stream:
                self._stream = stream
                try:
                    for event in stream:
                        if cancelled.is_set():
                            break
                        if event.type == "text" and event.text:
                            on_text(event.text)
                except ValueError as exc:  # the model sent tool input that is not JSON: its tools say so
                    message = stream.current_message_snapshot
                    for block in message.content:
                        if block.type == "tool_use":
                            block.input = {"__malformed__": str(exc).split(". JSON:")[0]}
                    message.stop_reason = "tool_use"
                    return self._reply(message)
                if cancelled.is_set():
                    raise Cancelled()
                message = stream.get_final_message()
        except anthropic.APIError as exc:
            if cancelled.is_set():
                raise Cancelled() from None
            raise ModelError(*anthropic_error(exc)) from None
        finally:
            self._stream = None
        return self._reply(message)

    @staticmethod
    def _reply(message):
        """The neutral Reply for a final (or snapshot) Message."""
        def tokens(field):
            return getattr(message.usage, field, 0) or 0

        return Reply(text="".join(b.text for b in message.content if b.type == "text"),
                     tool_calls=[ToolUse(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"],
                     stop=ANTHROPIC_STOPS.get(message.stop_reason, STOP_DONE),
                     usage=Usage(tokens("input_tokens"), tokens("output_tokens"), tokens("cache_read_input_tokens"),
                                 tokens("cache_creation_input_tokens")))


# ---- context windows (how many input tokens a model takes; the agent clears old tool results near it) ----

CONTEXT_WINDOWS = (  # (model-name prefix, tokens): the first prefix that matches wins
    ("claude-", 200_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-5", 400_000),
    ("o1", 200_000), ("o3", 200_000), ("o4", 200_000),
    ("gemini-", 1_048_576),
)
DEFAULT_CONTEXT_WINDOW = 128_000  # a model the table does not know (a local server's, say): set STIGMER_CONTEXT_WINDOW


def context_window(name, override=0):
    """The context window of model NAME ("provider/model" or bare), in tokens; OVERRIDE (from
    STIGMER_CONTEXT_WINDOW) wins when set."""
    if override:
        return int(override)
    model = (name or "").strip().rpartition("/")[2].lower()
    return next((tokens for prefix, tokens in CONTEXT_WINDOWS if model.startswith(prefix)), DEFAULT_CONTEXT_WINDOW)
