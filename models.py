"""Model providers: the Model seam, model-name resolution, default models and error messages.

    import models
    provider, name = models.resolve("gpt-4.1")              # ("openai", "gpt-4.1")
    model = models.make_model("openai/gpt-4.1", environ)   # environ: runner.Config.environ (keys, base URLs)
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
import json
import logging
import os
import re
import sys
import threading
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("stigmer.models")
FALLBACK_MODEL = "claude-sonnet-4-5"  # when the installed SDK lists no Sonnet
BARE_PREFIXES = (("claude-", "anthropic"), ("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"),
                 ("o3", "openai"), ("o4", "openai"), ("gemini-", "gemini"))  # bare model name -> provider
MAX_OUTPUT_TOKENS = 16000  # max_tokens per model request
STREAM_RETRIES = 2  # extra attempts when the connection drops in the middle of a streamed reply
API_RETRIES = 2  # extra attempts when the API fails in a way that may pass (429, 5xx, ...); the SDKs' own are off
RETRY_CAP = 8.0  # seconds, the longest pause before asking again
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

    def __init__(self, code, message, pause=None):
        super().__init__(message)
        self.code, self.message = code, message
        self.pause = pause  # seconds to wait before asking again, when the failure may pass (else None)


def api_failure(code_message, exc):
    """The ModelError for the SDK error EXC ((code, message) from the adapter): one that may pass (408, 409, 429,
    5xx, no connection, a timeout) carries the pause before asking again, the API's retry-after when it says."""
    status = getattr(exc, "status_code", None)
    passing = (status in (408, 409, 429) or status >= 500) if status is not None else \
        type(exc).__name__ in ("APIConnectionError", "APITimeoutError")
    pause = None
    if passing:
        headers = getattr(getattr(exc, "response", None), "headers", None) or {}
        try:
            pause = max(0.0, float(headers.get("retry-after")))
        except (TypeError, ValueError):
            pause = 0.0  # the backoff decides
    return ModelError(*code_message, pause=pause)


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
    """The project's secrets.py, beside the standard library's `secrets`: the one way every module, test and
    bench loads it (as `secrets` where ours comes first on sys.path, else as `stigmer_secrets`)."""
    return _project_module("secrets", "stigmer_secrets")


def model_key_vars():
    """Every provider key variable: hidden from the agent's shell, kept from the daemon, redacted."""
    return tuple(dict.fromkeys(var for p in project_secrets().PROVIDERS.values() for var in p.key_vars))


_TABLE = project_secrets().PROVIDERS  # the one provider table (secrets.py): what follows is read from it
PROVIDERS = tuple(_TABLE)  # "provider/model" prefixes
DEFAULT_MODELS = {name: p.default_model for name, p in _TABLE.items()}  # None: see default_model
KEYS = {name: p.key_vars for name, p in _TABLE.items()}  # the variables a provider's key may come from, first wins
GEMINI_BASE_URL = _TABLE["gemini"].base_url
OLLAMA_HOST = _TABLE["ollama"].base_url  # where Ollama listens unless OLLAMA_HOST says otherwise
OPENAI_BASE_URL = _TABLE["openai"].base_url
KEYLESS = "not-needed"  # what an OpenAI-compatible server without auth gets (the SDK insists on a key)


def default_model(provider="anthropic"):
    """PROVIDER's default model: from DEFAULT_MODELS, or for Anthropic the newest Sonnet in the installed
    SDK's model list, read from its source without importing it."""
    if provider != "anthropic":
        if DEFAULT_MODELS.get(provider):
            return DEFAULT_MODELS[provider]
        raise ModelError("model", f"{provider} has no default model: name one, as {provider}/MODEL "
                                  "(the name the server lists)")
    found = importlib.util.find_spec("anthropic")
    try:
        with open(os.path.join(os.path.dirname(found.origin), "types", "model.py")) as f:
            names = re.findall(r'"(claude-sonnet-[0-9][0-9a-z-]*)"', f.read())
    except (OSError, AttributeError, TypeError):
        names = []
    undated = [n for n in names if not re.search(r"-\d{8}$", n)]
    return (undated or names or [FALLBACK_MODEL])[0]


def _bare_provider(name):
    """The provider a bare model name belongs to, by its prefix; None when no prefix matches."""
    for prefix, provider in BARE_PREFIXES:
        if name.startswith(prefix) and (prefix.endswith("-") or re.match(r"o\d(-|$)", name)):
            return provider
    return None


def resolve(name):
    """(provider, model) for a model name: "provider/model", a provider alone ("openai", "ollama/") for its
    default model, a bare name known by its prefix ("claude-...", "gpt-...", "o3...", "gemini-..."), or ""
    for the default (Anthropic's newest Sonnet)."""
    name = (name or "").strip()
    if not name:
        return "anthropic", default_model()
    provider, slash, model = name.partition("/")
    if provider.lower() in PROVIDERS:
        provider, model = provider.lower(), model.strip()
        return provider, model or default_model(provider)
    if not slash and _bare_provider(name):
        return _bare_provider(name), name
    raise ModelError("model", f"the model name {name!r} is not one this runner knows: give provider/model "
                              f"(providers: {', '.join(PROVIDERS)}; for example openai/gpt-4.1 or ollama/qwen3:8b), "
                              "a bare name starting with claude-, gpt-, o1, o3, o4 or gemini-, or nothing for the "
                              "default (the newest Claude Sonnet)")


def qualified(name):
    """NAME resolved and written as provider/model: what an execution's record keeps."""
    return "/".join(resolve(name))


def make_model(name, environ=None):
    """The model object for NAME (see resolve). ENVIRON (runner.Config.environ) holds the keys and base URLs;
    the provider's SDK is imported here, once per process."""
    provider, model = resolve(name)
    environ = {} if environ is None else environ
    base_url, key, key_var = endpoint(provider, environ)
    client = shared_client(provider, base_url, key, key_var)
    if provider == "anthropic":
        return AnthropicModel(model, client)
    return OpenAIChatModel(model, provider=provider, base_url=base_url, key_var=key_var, client=client)


def check_provider(provider, environ):
    """Raise ModelError when this runner cannot use PROVIDER whatever the key: its SDK is not installed, or
    openai-compatible has no OPENAI_BASE_URL. The CLI calls it before asking for a key."""
    problems = project_secrets().provider_problems(provider, environ)
    if problems:
        raise ModelError("missing_sdk" if "package" in problems[0] else "config", problems[0])


def preload(name="", environ=None):
    """Import NAME's provider SDK and make its client now: it takes seconds, better spent before the first turn.
    A name that does not resolve, or lacks its key, loads nothing (make_model reports it)."""
    try:
        make_model(name, environ)
    except ModelError:
        return


_shared = {}  # (provider, base URL, key) -> SDK client: executions share its connection pool
_shared_lock = threading.Lock()


def shared_client(provider, base_url, key, key_var=""):
    """One SDK client per process and (provider, base URL, key), made on first use (thread-safe): executions
    share its connection pool, and a changed setting never reaches a stale server. KEY_VAR says what the key
    is (ANTHROPIC_AUTH_TOKEN: a bearer token)."""
    settings = (provider, base_url, key_var, key)
    with _shared_lock:
        if settings not in _shared:
            if provider == "anthropic":
                import anthropic
                token = key_var == "ANTHROPIC_AUTH_TOKEN"
                _shared[settings] = anthropic.Anthropic(api_key=None if token else key, auth_token=key if token else None,
                                                        base_url=base_url, max_retries=0)  # ours: visible
            else:
                openai = import_openai()
                _shared[settings] = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0)  # ours: visible
        return _shared[settings]


def _shared_anthropic():
    """The anthropic client with the SDK's own settings (an AnthropicModel made without one)."""
    return shared_client("anthropic", None, None)


def _ollama_url(host):
    """OLLAMA_HOST (host:port, or a URL) as the base URL of Ollama's OpenAI-compatible API."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
    return host if host.endswith("/v1") else host + "/v1"


def endpoint(provider, environ):
    """(base URL, key, the key's variable) for PROVIDER from ENVIRON; raises ModelError when a needed
    setting is missing. A base URL of None means the SDK's default."""
    var = next((v for v in KEYS[provider] if environ.get(v)), None)
    key = environ[var] if var else None
    p = _TABLE[provider]
    base = environ.get(p.base_url_var) or p.base_url
    if provider == "anthropic":
        base = (base or "").rstrip("/") or None
        if base and base.endswith("/v1"):  # the SDK adds /v1/messages itself
            base = base[:-3]
    elif provider == "ollama":
        base, key, var = _ollama_url(base), KEYLESS, "OLLAMA_HOST"
    elif p.needs_server:
        if not base:
            raise ModelError("config", project_secrets().provider_problems(provider, environ, lambda _: True)[0])
        key, var = (key, var) if key else (KEYLESS, p.env_var)
    if key is None:
        wanted = " or ".join(KEYS[provider])
        raise ModelError("auth", f"{wanted} is not set where this runner runs, so it cannot use {provider}: "
                                 f"export {KEYS[provider][0]}=... (background workers: `python runner.py stop`, then "
                                 f"`python runner.py start --model {provider}/...` to be asked for it)")
    return base, key, var


def anthropic_error(exc):
    """(code, human message) for an anthropic SDK error, per class."""
    import anthropic
    if isinstance(exc, anthropic.AuthenticationError):
        return "auth", "the model API rejected the key (401): fix ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) and run again"
    if isinstance(exc, anthropic.PermissionDeniedError):
        return "permission", "the model API refused access (403): the key lacks permission for this model or organization"
    if isinstance(exc, anthropic.NotFoundError):
        return "not_found", (f"the model API answered 404 ({provider_message(exc)}): check the model name "
                             "(STIGMER_MODEL or --model)")
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
        return "bad_request", f"the model API refused the request (400): {provider_message(exc)}"
    if isinstance(exc, anthropic.APIStatusError):
        return "api_error", f"the model API failed ({exc.status_code}): {provider_message(exc)}"
    return "api_error", f"the model API failed: {exc}"


def provider_message(exc):
    """The provider's own words in an SDK status error (body.error.message), not the SDK's dump of the body."""
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else body.get("message") if isinstance(body, dict) else None
    if isinstance(message, str) and message.strip():
        return message.strip()
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    response = getattr(exc, "response", None)
    return getattr(response, "reason_phrase", "") or "no message"


ANTHROPIC_STOPS = {"tool_use": STOP_TOOL_USE, "max_tokens": STOP_MAX_TOKENS, "refusal": STOP_REFUSAL,
                   "model_context_window_exceeded": STOP_CONTEXT, "pause_turn": STOP_PAUSE}  # else STOP_DONE


class StreamedReply:
    """What both adapters share: the stream being read (closed by cancel) and the retry of a reply that
    breaks off mid-way."""

    _stream = None  # the stream being read, for close()
    temperature = None  # sampling temperature (an agent's spec.config) for Chat Completions; None: the API's default.
    #                     (The anthropic SDK's Messages API takes none: Claude's sampling is the model's own.)
    max_output_tokens = 0  # max output tokens per request (an agent's spec.config); 0: MAX_OUTPUT_TOKENS

    _wake = None  # set when the request in flight ends, or by close(): what turn() waits on

    def close(self):
        """Abort the request in flight (cancel, from another thread): turn() raises Cancelled at once, even before
        the reply's first byte, and the stream being read, if any, is closed."""
        wake = self._wake
        if wake is not None:
            wake.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:  # closing from another thread may race the reader; the cancel flag counts
                log.debug("closing the reply stream on cancel: %s", exc)

    def _abandonable(self, request_once, cancelled):
        """REQUEST_ONCE() run on its own thread, so that a cancel (close()) returns at once, whatever the request is
        doing: waiting for the API's first byte can take as long as the model thinks. An abandoned request ends on
        its own (its stream is closed, or its reply is dropped); nothing it returns is used."""
        wake, box = threading.Event(), {}

        def run():
            try:
                box["reply"] = request_once()
            except BaseException as exc:  # raised again on the caller's thread
                box["error"] = exc
            finally:
                wake.set()
        self._wake = wake
        if cancelled.is_set():  # cancelled before this request began (close() saw the previous one)
            raise Cancelled()
        threading.Thread(target=run, name="model-request", daemon=True).start()
        wake.wait()
        if cancelled.is_set():
            raise Cancelled()
        if "error" in box:
            raise box["error"]
        return box["reply"]

    def _retrying(self, request_once, cancelled, on_retry):
        """REQUEST_ONCE()'s Reply, asked for again, telling on_retry(message) each time: when its connection breaks
        mid-way (BrokenStream, up to STREAM_RETRIES times), and when the API fails in a way that may pass (a
        ModelError with a pause, up to API_RETRIES times, after the API's retry-after or a doubling backoff): the
        one retry path of every adapter. A cancel ends it at once (Cancelled), even during a request or a pause."""
        broken_off = failed = 0
        while True:
            try:
                return self._abandonable(request_once, cancelled)
            except BrokenStream as broken:
                if cancelled.is_set():
                    raise Cancelled() from None
                exc = broken.__cause__
                if broken_off == STREAM_RETRIES:
                    raise ModelError("connection", f"the connection to the model API broke mid-reply "
                                                   f"{broken_off + 1} times ({type(exc).__name__})") from None
                broken_off += 1
                if on_retry:
                    on_retry(f"the model's reply broke off ({type(exc).__name__}: {exc}); asking again")
            except ModelError as exc:
                if exc.pause is None or failed == API_RETRIES:
                    raise
                pause = min(RETRY_CAP, exc.pause or 0.5 * 2 ** failed)
                failed += 1
                if on_retry:
                    on_retry(f"retrying in {pause:.2g} s ({failed} of {API_RETRIES}): {exc.message}", "api_retry")
                if cancelled.wait(pause):
                    raise Cancelled() from None


class AnthropicModel(StreamedReply):
    """Claude through the anthropic SDK's streaming Messages API, with prompt caching."""

    provider = "anthropic"

    def __init__(self, model, client=None):
        self.model = model
        self.client = client  # an anthropic.Anthropic(); the process's shared one when None

    def turn(self, system_text, tools, messages, on_text, cancelled, on_retry=None):
        """One streamed reply to the neutral MESSAGES. A reply whose connection breaks mid-way is asked for
        again, up to STREAM_RETRIES times, telling on_retry(message) each time."""
        request = {"model": self.model, "max_tokens": self.max_output_tokens or MAX_OUTPUT_TOKENS,
                   "system": [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}],
                   "tools": [dict(t) for t in tools], "messages": [self._message(m) for m in messages]}
        request["tools"][-1]["cache_control"] = {"type": "ephemeral"}
        request["messages"][-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}  # the latest turn only

        def once():
            try:
                return self._request(request, on_text, cancelled)
            except (ModelError, Cancelled):
                raise
            except Exception as exc:
                if cancelled.is_set():
                    raise Cancelled() from None
                if type(exc).__module__.split(".")[0] in TRANSPORT_MODULES:  # the connection broke
                    raise BrokenStream() from exc
                raise
        return self._retrying(once, cancelled, on_retry)

    @staticmethod
    def _message(message):
        """One neutral message as Messages API content (assistant blocks keyed as the SDK dumps them)."""
        if message["role"] == "user":
            return {"role": "user", "content": [{"type": "text", "text": message["text"]}]}
        if message["role"] == "tool_results":
            return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r["id"],
                                                 "is_error": r["is_error"], "content": _result_content(r)}
                                                for r in message["results"]]}
        content = [{"text": message["text"], "type": "text"}] if message["text"] else []
        content += [{"id": c.id, "input": c.input, "name": c.name, "type": "tool_use"} for c in message["tool_calls"]]
        return {"role": "assistant", "content": content}

    def _request(self, request, on_text, cancelled):
        """One streamed request; returns its Reply."""
        import anthropic
        opened = False
        try:
            with (self.client or _shared_anthropic()).messages.stream(**request) as stream:
                opened = True
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
            if opened and type(exc) is anthropic.APIConnectionError:  # the SDK's name (2.17 on) for a body cut off
                raise BrokenStream() from exc
            raise api_failure(anthropic_error(exc), exc) from None
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


# ---- OpenAI Chat Completions: OpenAI, Gemini, Ollama, vLLM and any compatible server ----

OPENAI_EXTRA = f"pip install -e '.[{_TABLE['openai'].extra}]'"  # what installs the openai SDK
CONTEXT_WORDS = ("context length", "context window", "context_length", "maximum number of tokens", "too many tokens",
                 "prompt is too long")  # how compatible servers say the conversation no longer fits
CHAT_STOPS = {"tool_calls": STOP_TOOL_USE, "function_call": STOP_TOOL_USE, "length": STOP_MAX_TOKENS,
              "content_filter": STOP_REFUSAL}  # finish_reason -> stop kind; "stop" and the rest: done


def import_openai():
    """The openai SDK, or a ModelError that says how to install it."""
    try:
        import openai
    except ImportError:
        raise ModelError("missing_sdk", f"this model needs the openai package: {OPENAI_EXTRA}") from None
    return openai


class OpenAIChatModel(StreamedReply):
    """A streaming Chat Completions API with tools (OpenAI, Gemini, Ollama, any compatible server)."""

    def __init__(self, model, *, provider="openai", base_url=None, key_var="OPENAI_API_KEY", client=None):
        self.provider, self.model, self.base_url, self.key_var = provider, model, base_url, key_var
        self.client = client  # an openai.OpenAI(); make_model gives the process's shared one

    def request(self, system_text, tools, messages):
        """The request body: built the same way every turn, so the prefix stays byte-identical from request
        to request and automatic prefix caching (OpenAI, Gemini) hits it."""
        body = {"model": self.model, "messages": chat_messages(system_text, messages),
                "tools": [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                            "parameters": t["input_schema"]}} for t in tools],
                "stream": True, "stream_options": {"include_usage": True}}
        # OpenAI's reasoning models take only max_completion_tokens; many compatible servers only max_tokens.
        body["max_completion_tokens" if self.provider == "openai" else "max_tokens"] = \
            self.max_output_tokens or MAX_OUTPUT_TOKENS
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def turn(self, system_text, tools, messages, on_text, cancelled, on_retry=None):
        """One streamed reply; see AnthropicModel.turn (the same retries of a reply that breaks off)."""
        openai = import_openai()
        body = self.request(system_text, tools, messages)

        def once():
            try:
                return self._request(body, on_text, cancelled)
            except openai.APIError as exc:
                if cancelled.is_set():
                    raise Cancelled() from None
                raise api_failure(self.error(exc), exc) from None
        return self._retrying(once, cancelled, on_retry)

    def _request(self, body, on_text, cancelled):
        """One streamed request; returns its Reply."""
        openai = import_openai()
        text, calls, finish, usage, refused = [], [], None, None, False
        stream = self.client.chat.completions.create(**body)
        self._stream = stream
        try:
            for chunk in _mid_reply(stream, openai):
                if cancelled.is_set():
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    delta = choice.delta
                    if delta is not None:
                        if delta.content:
                            text.append(delta.content)
                            on_text(delta.content)
                        refused = refused or bool(getattr(delta, "refusal", None))
                        for call in delta.tool_calls or ():
                            _add_call_delta(calls, call)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        finally:
            self._stream = None
            stream.close()
        if cancelled.is_set():
            raise Cancelled()
        tool_calls = [ToolUse(call["id"] or f"call_{n}", call["name"], parse_arguments("".join(call["arguments"])))
                      for n, call in enumerate(calls)]
        stop = STOP_REFUSAL if refused else CHAT_STOPS.get(finish, STOP_DONE)
        if stop == STOP_DONE and tool_calls:
            stop = STOP_TOOL_USE  # some servers (Ollama) end a tool-calling reply with "stop"
        return Reply("".join(text), tool_calls, stop, chat_usage(usage))

    def error(self, exc):
        """(code, human message) for an openai SDK error, per class, naming this provider's settings."""
        openai = import_openai()
        detail = provider_message(exc)
        if isinstance(exc, openai.AuthenticationError):
            return "auth", f"the model API rejected the key (401): fix {self.key_var} and run again"
        if isinstance(exc, openai.PermissionDeniedError):
            return "permission", f"the model API refused access (403): {detail}"
        if isinstance(exc, openai.NotFoundError):
            hint = f"; for Ollama, `ollama pull {self.model}`" if self.provider == "ollama" else ""
            return "not_found", (f"the model API answered 404 ({detail}): check the model name "
                                 f"(STIGMER_MODEL or --model){hint}")
        if isinstance(exc, openai.RateLimitError):
            return "rate_limit", "rate limited by the model API (429) after retries: wait a minute and run again"
        if isinstance(exc, openai.APITimeoutError):
            return "timeout", "the model API timed out after retries"
        if isinstance(exc, openai.APIConnectionError):
            setting = {"ollama": "OLLAMA_HOST (is `ollama serve` running?)", "gemini": "GEMINI_BASE_URL"}.get(
                self.provider, "OPENAI_BASE_URL")
            return "connection", f"could not reach the model API ({self.base_url}): check your network or {setting}"
        if isinstance(exc, openai.BadRequestError):
            if getattr(exc, "code", None) == "context_length_exceeded" or any(w in detail.lower() for w in CONTEXT_WORDS):
                return "context_window", "the conversation no longer fits the model's context window"
            return "bad_request", f"the model API refused the request (400): {detail}"
        if isinstance(exc, openai.APIStatusError):
            return "api_error", f"the model API failed ({exc.status_code}): {detail}"
        return "api_error", f"the model API failed: {detail}"


class BrokenStream(Exception):
    """The connection broke after the reply had begun (raised from the transport's error): ask again."""


def _mid_reply(stream, openai):
    """The stream's chunks; a connection that breaks while they arrive raises BrokenStream."""
    try:
        yield from stream
    except openai.APIConnectionError as exc:  # the SDK's name for a transport error
        raise BrokenStream() from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in TRANSPORT_MODULES:
            raise BrokenStream() from exc
        raise


def _add_call_delta(calls, delta):
    """Fold one streamed tool-call delta into CALLS (a list of {"id", "name", "arguments": [parts]}).
    A delta names its call by index; servers that send no index start a call with an id."""
    index = delta.index
    if index is None:
        index = len(calls) if delta.id or not calls else len(calls) - 1
    while len(calls) <= index:
        calls.append({"id": "", "name": "", "arguments": []})
    call = calls[index]
    if delta.id:
        call["id"] = delta.id
    if delta.function is not None:
        if delta.function.name:
            call["name"] += delta.function.name
        if delta.function.arguments:
            call["arguments"].append(delta.function.arguments)


def chat_usage(usage):
    """The turn's Usage from a Chat Completions usage (cached prompt tokens count as cache reads)."""
    if usage is None:
        return Usage(0, 0, 0, 0)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
    return Usage((usage.prompt_tokens or 0) - cached, usage.completion_tokens or 0, cached, 0)


def parse_arguments(raw):
    """A tool call's JSON arguments as a dict, or the malformed-input marker the agent answers with an error."""
    try:
        value = json.loads(raw or "{}")
    except ValueError as exc:
        return {"__malformed__": str(exc)}
    return value if isinstance(value, dict) else {"__malformed__": f"expected a JSON object, got {type(value).__name__}"}


def chat_messages(system_text, messages):
    """The system text and the neutral MESSAGES as Chat Completions messages."""
    out = [{"role": "system", "content": system_text}]
    for m in messages:
        if m["role"] == "user":
            out.append({"role": "user", "content": m["text"]})
        elif m["role"] == "assistant":
            message = {"role": "assistant", "content": m["text"] or None}
            if m["tool_calls"]:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": json.dumps(c.input, ensure_ascii=False)}} for c in m["tool_calls"]]
            out.append(message)
        else:
            out += [{"role": "tool", "tool_call_id": r["id"], "content": r["output"] + _images_note(r)}
                    for r in m["results"]]
    return out

def _result_content(result):
    """A tool result's content for the Messages API: its text, or text and image blocks when it has images."""
    if not result.get("images"):
        return result["output"]
    import base64
    return [{"type": "text", "text": result["output"]}] + [
        {"type": "image", "source": {"type": "base64", "media_type": mime, "data": base64.b64encode(data).decode()}}
        for mime, data in result["images"]]


def _images_note(result):
    """What a chat-completions tool message says of a result's images (that API takes only text there)."""
    n = len(result.get("images", ()))
    return f"\n[{n} image{'s' if n != 1 else ''} returned by the tool: not shown, this model's API takes no " \
        "images in tool results]" if n else ""


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


def known_window(name):
    """The context window of model NAME in tokens when the table knows it, else 0."""
    model = (name or "").strip().rpartition("/")[2].lower()
    return next((tokens for prefix, tokens in CONTEXT_WINDOWS if model.startswith(prefix)), 0)


def context_window(name, override=0):
    """The context window of model NAME ("provider/model" or bare), in tokens; OVERRIDE (from
    STIGMER_CONTEXT_WINDOW) wins when set."""
    if override:
        return int(override)
    return known_window(name) or DEFAULT_CONTEXT_WINDOW
