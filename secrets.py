"""Provider API keys for the Stigmer runner: find them, ask for missing ones, pass them on, redact them.

    python secrets.py check                          # is ANTHROPIC_API_KEY set? (names only, never values)
    python secrets.py check --provider openai --secret GITHUB_TOKEN --json

The runner calls gather() once at start: a key already in the environment is used as is, a
missing one is asked for with a masked getpass prompt. child_env() hands the keys to the worker
subprocess, and Redactor replaces every value with [REDACTED:NAME] in whatever the model or the
event log sees, streamed chunk by chunk if need be.

Where a terminal is: getpass reads from /dev/tty (as ssh and sudo do), so a key can be typed even
when stdin is a pipe; failing that it uses stdin if stdin is a terminal. With neither, getpass
would read stdin with echo on, so gather() checks first and raises MissingSecret at once, naming
the variable to export. It never hangs.

The name: this file shadows the standard library's `secrets` whenever the checkout comes first on
sys.path (`python runner.py`, `python -m unittest`), and pydantic and httpx (under anthropic)
import `secrets`. So it re-exports the standard library module's whole API, loaded from the
stdlib's own file. Installed, the stdlib wins and runner.py loads this file as `stigmer_secrets`;
nothing here imports itself by name. Standard library only; nothing here writes a file or logs a
value.
"""
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig


def _stdlib_secrets():
    """The standard library's secrets module, loaded from its own file under a private name."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "secrets.py")
    for module in (sys.modules.get("secrets"), sys.modules.get("_stdlib_secrets")):
        file = getattr(module, "__file__", None)
        if file and os.path.realpath(file) == os.path.realpath(path):
            return module
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location("_stdlib_secrets", path)
    else:  # a zipped or frozen standard library: search sys.path without this file's directory
        here = os.path.dirname(os.path.realpath(__file__))
        dirs = [d for d in sys.path if os.path.realpath(d or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("secrets", dirs)
        spec.name = "_stdlib_secrets"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["_stdlib_secrets"] = module
    return module


_std = _stdlib_secrets()
# token_bytes, token_hex, token_urlsafe, compare_digest, choice, randbelow, randbits, SystemRandom
globals().update({name: getattr(_std, name) for name in _std.__all__})
DEFAULT_ENTROPY = _std.DEFAULT_ENTROPY

import argparse  # noqa: E402  (after the re-export: nothing below may import `secrets` half-built)
import copy  # noqa: E402
import getpass  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402

__all__ = list(_std.__all__) + [
    "DEFAULT_ENTROPY", "PROVIDERS", "Provider", "Secrets", "Redactor", "SecretError", "MissingSecret",
    "PromptCancelled", "gather", "sandbox_secret_names", "child_env", "main", "SECRET_WORDS", "looks_secret",
    "secret_looking_names", "SDK_EXTRAS", "SERVICE_KEY_VARS", "terminal_available", "URL_SECRET_VARS",
    "secret_values", "SECRETS_FD_VAR", "environment_secrets", "secrets_pipe", "reexec_without_secrets",
    "inherited_secrets", "provider_problems", "sdk_problem", "INHERIT_ALL", "hidden_from_shell", "shell_environment",
    "redacted_names", "refused_secrets",
]

MIN_REDACT_LEN = 8  # shorter values are not redacted: they would match ordinary text
MAX_ATTEMPTS = 3  # empty answers at the prompt before giving up
SANDBOX_SECRETS_VAR = "STIGMER_SANDBOX_SECRETS"  # NAME,NAME: like repeating --secret NAME
SERVICE_KEY_VARS = ("DAYTONA_API_KEY", "REDIS_URL")  # the runner's own service credentials: like model keys,
#                                          redacted, kept from the daemon and out of the agent's shell
URL_SECRET_VARS = ("REDIS_URL",)  # of these URLs only the password is secret (and redacted): the host is not
PREFILTER_MAX = 16  # up to this many values, a str.find per value skips the regex on clean chunks
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SecretError(Exception):
    """A secret could not be had; the message says what to do and never holds a value."""


class MissingSecret(SecretError):
    """A secret is not set and there is no terminal to ask on."""

    def __init__(self, names):
        self.names = tuple(names)
        what = " and ".join(self.names) + (" is" if len(self.names) == 1 else " are")
        exports = " ".join(f"{name}=..." for name in self.names)
        super().__init__(f"{what} not set and there is no terminal to ask on: export {exports} "
                         "or run `python runner.py start` in a terminal")


class PromptCancelled(SecretError):
    """Ctrl-C or end of input at the prompt; callers exit with code 130."""


@dataclass(frozen=True)
class Provider:
    """Everything the runner knows about a model provider, in one row: its key variables and what its keys
    look like, the SDK it is spoken to with (and the pyproject extra installing it), its default model, and
    the variable naming its server (with the address used when that is unset)."""
    name: str
    env_var: str
    alt_env_vars: tuple = ()  # also accepted, kept under their own name (the SDK reads them)
    prefix: str = ""  # what real keys start with; anything else gets a warning
    label: str = ""  # for the prompt
    required: bool = True  # False: used when set, never asked for (local servers need no key)
    sdk: str = "anthropic"  # the Python package the runner speaks to this provider with
    default_model: str = None  # the model when none is named; None: see models.default_model
    base_url_var: str = ""  # the variable naming the provider's server
    base_url: str = None  # the server when BASE_URL_VAR is unset; None: the SDK's default
    needs_server: bool = False  # True: BASE_URL_VAR must be set (there is no default server)

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", f"{self.name} API key")

    @property
    def key_vars(self):
        """The variables this provider's key may come from, first wins."""
        return tuple(v for v in (self.env_var, *self.alt_env_vars) if v)

    @property
    def extra(self):
        """The pyproject extra that installs the SDK ("" when the core install has it)."""
        return SDK_EXTRAS.get(self.sdk, "")


PROVIDERS = {p.name: p for p in (
    Provider("anthropic", "ANTHROPIC_API_KEY", ("ANTHROPIC_AUTH_TOKEN",), "sk-ant-", "Anthropic API key",
             base_url_var="ANTHROPIC_BASE_URL"),
    Provider("openai", "OPENAI_API_KEY", (), "sk-", "OpenAI API key", sdk="openai", default_model="gpt-4.1",
             base_url_var="OPENAI_BASE_URL", base_url="https://api.openai.com/v1"),
    Provider("gemini", "GEMINI_API_KEY", ("GOOGLE_API_KEY",), "AIza", "Gemini API key", sdk="openai",
             default_model="gemini-2.5-flash", base_url_var="GEMINI_BASE_URL",
             base_url="https://generativelanguage.googleapis.com/v1beta/openai/"),  # Google's OpenAI-compatible API
    Provider("ollama", "", label="Ollama (a local server; no key)", required=False, sdk="openai",
             default_model="qwen3:8b", base_url_var="OLLAMA_HOST", base_url="http://localhost:11434"),
    Provider("openai-compatible", "OPENAI_API_KEY", (), "", "API key of the OpenAI-compatible server",
             required=False, sdk="openai", base_url_var="OPENAI_BASE_URL", needs_server=True),  # it names the model
)}
SDK_EXTRAS = {"openai": "openai"}  # SDK package -> the pyproject extra that installs it


def provider_problems(name, environ, installed=None):
    """Why this runner cannot use provider NAME whatever the key, in lines for a person: its SDK is not
    installed (sdk_problem), or a server it needs is not named. INSTALLED(package) -> bool defaults to a
    find_spec check (the SDK is looked for, never imported)."""
    p = PROVIDERS[name]
    missing = sdk_problem(name, installed)
    problems = [missing] if missing else []
    if p.needs_server and not environ.get(p.base_url_var):
        problems.append(f"{name} needs {p.base_url_var}, the server's address (for example "
                        f"export {p.base_url_var}=http://localhost:8000/v1)")
    return problems


def sdk_problem(name, installed=None):
    """One line when provider NAME's SDK is not installed where this runs (naming what installs it), else None."""
    p = PROVIDERS[name]
    if (installed or (lambda package: importlib.util.find_spec(package) is not None))(p.sdk):
        return None
    return (f"{name} needs the {p.sdk} package: pip install -e '.[{p.extra}]'" if p.extra
            else f"{name} needs the {p.sdk} package: pip install -e .")


# ---- what the agent's shell may see ----

INHERIT_ALL = "*"  # in ExecutionSpec.secret_names: secret-looking variables reach the shell too (--inherit-env)


def hidden_from_shell(environ, named, key_vars, inherit=False):
    """The shell_env overrides that keep the model keys (KEY_VARS) and, unless INHERIT, every secret-looking
    variable of ENVIRON out of the agent's shell; names in NAMED (--secret) pass."""
    hidden = set(key_vars) | (set() if inherit else {n for n in environ if looks_secret(n)})
    return {name: None for name in sorted(hidden) if name not in named}


def shell_environment(environ, named, key_vars, inherit=False):
    """The shell_env overrides of an execution: hidden_from_shell's, plus the value of every variable the shell
    may see that only the worker's memory holds (its secrets are not in its environment block, which the shell
    inherits): the NAMED ones and, with INHERIT, every secret-looking one (never a key that was not named)."""
    overrides = hidden_from_shell(environ, named, key_vars, inherit)
    passed = set(named) | ({n for n in environ if looks_secret(n)} if inherit else set())
    overrides.update({n: environ[n] for n in sorted(passed) if environ.get(n) and overrides.get(n, "") is not None})
    return overrides


def redacted_names(environ, named, key_vars):
    """Every variable whose value is redacted from what the model and the log see: the model keys
    (KEY_VARS), the --secret names and every secret-looking variable present, passed to the shell or not."""
    names = [*key_vars, *named, *sorted(n for n in environ if looks_secret(n))]
    return [n for n in dict.fromkeys(names) if environ.get(n)]


def refused_secrets(secret_names, key_vars, allowed):
    """The names in SECRET_NAMES that a worker refuses: a provider or service key (KEY_VARS), or `*` (every
    variable), unless ALLOWED holds it (the user asked for it when starting that worker for the run)."""
    return [n for n in dict.fromkeys(secret_names) if (n == INHERIT_ALL or n in key_vars) and n not in allowed]


class Secrets(Mapping):
    """Secret values by variable name; repr and str show names only."""

    def __init__(self, values=()):
        self._values = dict(values)

    def __getitem__(self, name):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    @property
    def names(self):
        """The variable names, in the order they were gathered."""
        return tuple(self._values)

    def redactor(self):
        """A Redactor for these values."""
        return Redactor(self._values)

    def __repr__(self):
        return "Secrets(" + ", ".join(f"{name}='***'" for name in self._values) + ")"

    __str__ = __repr__


def sandbox_secret_names(cli_names=(), environ=None):
    """Names from repeated --secret NAME, then $STIGMER_SANDBOX_SECRETS, deduplicated in order."""
    environ = os.environ if environ is None else environ
    from_env = [n.strip() for n in environ.get(SANDBOX_SECRETS_VAR, "").split(",") if n.strip()]
    names = []
    for source, name in [("--secret", n) for n in cli_names] + [(SANDBOX_SECRETS_VAR, n) for n in from_env]:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise SecretError(f"{source} {name!r} is not an environment variable name "
                              "(letters, digits and _, not starting with a digit)")
        if name not in names:
            names.append(name)
    return names


SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")  # names holding one of these look secret
NOT_SECRET = ("STIGMER_SANDBOX_SECRETS",)  # settings whose names look secret but hold names, not values


def looks_secret(name):
    """True when an environment variable's NAME suggests it holds a secret (case-insensitive)."""
    upper = name.upper()
    return name not in NOT_SECRET and any(word in upper for word in SECRET_WORDS)


def secret_looking_names(environ=None):
    """The names in ENVIRON (default os.environ) that look secret and have a non-empty value, sorted."""
    environ = os.environ if environ is None else environ
    return sorted(name for name, value in environ.items() if value and looks_secret(name))


def gather(providers=("anthropic",), extra=(), *, environ=None, prompt=None, stdin_isatty=None, warn=None,
           labels=None):
    """Collect provider keys and extra secrets: from the environment, else a masked prompt.

    stdin_isatty overrides the terminal check (None: /dev/tty opens, or stdin is a terminal).
    labels: what the prompt says for an extra name (an agent's description of it), by name.
    """
    environ = os.environ if environ is None else environ
    prompt = getpass.getpass if prompt is None else prompt
    warn = _warn if warn is None else warn
    wanted = {}  # variable name -> (alternative names, label, expected prefix)
    for key in providers:
        if key not in PROVIDERS:
            raise SecretError(f"unknown provider {key!r}: known providers are {', '.join(PROVIDERS)}")
        p = PROVIDERS[key]
        if not p.env_var:
            continue
        if not p.required:  # an optional key is passed on when set and never asked for
            if environ.get(p.env_var):
                wanted.setdefault(p.env_var, ((), p.label, ""))
            continue
        wanted.setdefault(p.env_var, (p.alt_env_vars, p.label, p.prefix))
    for name in sandbox_secret_names(extra, environ={}):
        wanted.setdefault(name, ((), (labels or {}).get(name) or "Secret for the agent's shell", ""))
    found = {}
    for name, (alts, _, _) in wanted.items():
        var = next((v for v in (name, *alts) if environ.get(v)), None)
        found[name if var is None else var] = None if var is None else environ[var]
    missing = [name for name, value in found.items() if value is None]
    if missing and not (_terminal_available() if stdin_isatty is None else stdin_isatty):
        raise MissingSecret(missing)
    for name in missing:
        _, label, prefix = wanted[name]
        found[name] = _ask(prompt, f"{label}, input hidden ({name}): ", name, prefix, warn)
    return Secrets(found)


def _ask(prompt, question, name, prefix, warn):
    """Ask until a non-empty answer, at most MAX_ATTEMPTS times; refuse control characters."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            value = (prompt(question) or "").strip()
        except (KeyboardInterrupt, EOFError):
            raise PromptCancelled(f"cancelled at the prompt for {name}") from None
        if value:
            break
        if attempt < MAX_ATTEMPTS:
            warn(f"{name}: the answer was empty; paste the value ({MAX_ATTEMPTS - attempt} more tries)")
    else:
        raise SecretError(f"{name}: {MAX_ATTEMPTS} empty answers; export {name}=... or type it at the prompt")
    if _CONTROL.search(value):
        raise SecretError(f"{name}: the value holds a newline or control character, so it was refused "
                          "(it is not shown)")
    if prefix and not value.startswith(prefix):
        warn(f"{name} does not start with {prefix!r} as keys of its kind do; using it anyway")
    return value


def terminal_available():
    """True where a masked prompt can be shown (see _terminal_available)."""
    return _terminal_available()


def _terminal_available():
    """True where getpass can read with echo off: /dev/tty opens, or stdin is a terminal."""
    if os.name == "posix":
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
            return True
        except OSError:
            pass
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdin
        return False


def _warn(message):
    print(message, file=sys.stderr, flush=True)


def secret_values(values):
    """{name: what to redact} for VALUES ({name: value} of secret variables): the value itself, or for a URL
    in URL_SECRET_VARS its password only (none: nothing), so `redis://:[REDACTED:REDIS_URL]@host` still says
    which Redis it is."""
    from urllib.parse import urlsplit
    out = {}
    for name, value in dict(values).items():
        if name in URL_SECRET_VARS and isinstance(value, str):
            try:
                value = urlsplit(value).password or ""
            except ValueError:  # not a URL as far as urllib can tell: all of it is secret
                pass
        out[name] = value
    return out


def child_env(secrets, base=None):
    """The worker subprocess's environment: base (default os.environ) plus the secrets."""
    env = dict(os.environ if base is None else base)
    for name, value in secrets.items():
        if not isinstance(value, str):
            raise SecretError(f"{name}: a secret must be a string")
        env[name] = value
    return env


class Redactor:
    """Replaces each secret value of MIN_REDACT_LEN or more characters with [REDACTED:NAME].

    Every occurrence of every value is found, overlapping ones included. Occurrences that
    overlap merge into one span, labelled with the longest value in it (of values as long, the
    one named first), so no character of any value survives: with A="AAAABBBB" and
    B="BBBBCCCCCCCC", "xAAAABBBBCCCCCCCCx" becomes "x[REDACTED:B]x". Occurrences that merely
    touch keep a label each. A value held under two names is labelled with the first.

    redact(text) works on a whole text. feed(chunk) and flush() work on a stream, and give the
    same result: the concatenated output of feed()s and flush() equals redact() of the
    concatenated input, however it is split. feed holds back only a tail that could begin a
    value (at most the longest value's length minus one characters), plus, while such a tail
    starts inside a span, that span: it is secret text whose label a later value may change.
    Use stream() for each further stream.
    """

    def __init__(self, secrets=None):
        labels = {}
        for name, value in dict(secrets or {}).items():
            if isinstance(value, str) and len(value) >= MIN_REDACT_LEN:
                labels.setdefault(value, f"[REDACTED:{name}]")
        self._labels = labels
        self._values = sorted(labels, key=len, reverse=True)
        self._rank = {value: i for i, value in enumerate(self._values)}  # lower wins a merged span
        self.names = tuple(dict.fromkeys(label[10:-1] for label in labels.values()))
        self._pending = ""
        self._pattern = self._starts = None
        if labels:
            # Longest first, so a match is the longest value starting at its position.
            self._pattern = re.compile("|".join(map(re.escape, self._values)))
            # Where a held-back tail may begin: a value's first two characters, or its first at the end.
            firsts = "".join(sorted({re.escape(v[0]) for v in self._values}))
            heads = sorted({re.escape(v[:2]) for v in self._values})
            self._starts = re.compile(f"(?={'|'.join(heads)}|[{firsts}]\\Z)")
        self._hold = len(self._values[0]) - 1 if labels else 0
        self._prefilter = len(labels) <= PREFILTER_MAX

    def _clean(self, text):
        """True when no value occurs in text, so the regex can be skipped."""
        if not self._prefilter:
            return False
        for value in self._values:
            if value in text:
                return False
        return True

    def _spans(self, text):
        """(start, end, value) for each run of overlapping occurrences in text, left to right;
        value is the one whose label the run gets."""
        search, rank = self._pattern.search, self._rank
        match = search(text)
        while match:
            start, end, best = match.start(), match.end(), match.group()
            match = search(text, start + 1)  # the next occurrence starting anywhere later
            while match and match.start() < end:  # it overlaps the run: merge it
                end = max(end, match.end())
                if rank[match.group()] < rank[best]:
                    best = match.group()
                match = search(text, match.start() + 1)
            yield start, end, best

    def redact(self, text):
        """Text with every secret value replaced by [REDACTED:NAME]."""
        if self._pattern is None or self._clean(text):
            return text
        out, pos = [], 0
        for start, end, best in self._spans(text):
            out += (text[pos:start], self._labels[best])
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def redact_json(self, text):
        """TEXT, a JSON document, with every secret value redacted in each string, key and number as decoded,
        so that a value holding `"` or `\\` is found although JSON escapes it; the result is still JSON (a
        redacted number becomes a string). Text that is not JSON is redacted as text."""
        if self._pattern is None or self._clean(text) and "\\" not in text:
            return text
        try:
            value = json.loads(text)
        except ValueError:
            return self.redact(text)
        redacted = self._redact_value(value)
        return text if redacted == value else json.dumps(redacted, ensure_ascii=False)

    def _redact_value(self, value):
        """VALUE (decoded JSON) with its strings, keys and numbers redacted."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            written = json.dumps(value)
            redacted = self.redact(written)
            return value if redacted == written else redacted
        if isinstance(value, list):
            return [self._redact_value(v) for v in value]
        if isinstance(value, dict):
            return {self.redact(k): self._redact_value(v) for k, v in value.items()}
        return value

    def feed(self, chunk):
        """Redact the next piece of a stream; returns what is safe to pass on now."""
        if self._pattern is None:
            return chunk
        text = self._pending + chunk if self._pending else chunk
        held = self._held_from(text)  # only an occurrence starting here or later can still grow
        if self._clean(text):
            self._pending = text[held:]
            return text[:held]
        out, pos, cut = [], 0, held
        for start, end, best in self._spans(text):
            if start >= held:  # may yet grow into a longer value: decide on the next feed
                break
            if end > held:  # a later occurrence may still overlap it, and change its label
                cut = start
                break
            out += (text[pos:start], self._labels[best])
            pos = end
        cut = max(cut, pos)
        out.append(text[pos:cut])
        self._pending = text[cut:]
        return "".join(out)

    def flush(self):
        """End of the stream: the held-back text, redacted."""
        text, self._pending = self._pending, ""
        return self.redact(text)

    def stream(self):
        """A Redactor with the same secrets and an empty buffer, for another stream."""
        other = copy.copy(self)
        other._pending = ""
        return other

    def _held_from(self, text):
        """Where the longest tail of text that is a proper prefix of some value begins."""
        for match in self._starts.finditer(text, max(0, len(text) - self._hold)):
            tail = text[match.start():]
            for value in self._values:
                if len(value) > len(tail) and value.startswith(tail):
                    return match.start()
        return len(text)

    def __repr__(self):
        return "Redactor(" + ", ".join(f"{name}='***'" for name in self.names) + ")"


SECRETS_FD_VAR = "STIGMER_SECRETS_FD"  # a worker started with its secrets in a pipe: that pipe's fd
PIPE_CAPACITY = 65536  # bytes a pipe holds before a write waits for a reader (Linux and macOS)


def key_var_names():
    """Every provider key variable (alternatives too) and every service credential."""
    return {v for p in PROVIDERS.values() for v in (p.env_var, *p.alt_env_vars) if v} | set(SERVICE_KEY_VARS)


def environment_secrets(environ, extra=()):
    """The variables of ENVIRON that a worker keeps out of its environment block: provider keys, service
    credentials, secret-looking names and EXTRA (--secret names), those with a value."""
    keys = key_var_names() | set(extra)
    return {n: v for n, v in environ.items() if v and (n in keys or looks_secret(n))}


def secrets_pipe(values):
    """A pipe holding VALUES ({name: value}) for a child to inherit: returns its read end (inheritable; the
    caller closes it once the child runs). A process's environment block stays readable, at /proc/PID/environ,
    by every process of the same user for as long as it lives (the agent's shell among them); a pipe, once read,
    holds nothing."""
    data = json.dumps(dict(values)).encode()
    read_fd, write_fd = os.pipe()
    try:
        if len(data) >= PIPE_CAPACITY:
            import fcntl
            try:
                fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), len(data) + 1)
            except OSError:
                raise SecretError(f"{len(data)} bytes of secrets do not fit a pipe here: pass fewer") from None
        os.write(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    os.set_inheritable(read_fd, True)
    return read_fd


def reexec_without_secrets(names, environ=None, carried=()):
    """Replace this process by itself (the same interpreter and arguments, the same pid, its open inheritable
    files) with the variables NAMES moved from its environment into a pipe (see secrets_pipe), with CARRIED
    ({name: value} already read from one). Never returns. The new process takes them back with
    inherited_secrets()."""
    env = dict(os.environ if environ is None else environ)
    moved = {**dict(carried), **{n: env.pop(n) for n in names if n in env}}
    env[SECRETS_FD_VAR] = str(secrets_pipe(moved))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def inherited_secrets(environ=None):
    """The variables a spawner (or reexec_without_secrets) put in the pipe named by SECRETS_FD_VAR, read to the
    end and closed ({} without one). SECRETS_FD_VAR leaves ENVIRON (default os.environ) too."""
    environ = os.environ if environ is None else environ
    fd = environ.pop(SECRETS_FD_VAR, "")
    if not fd:
        return {}
    try:
        chunks = []
        while True:
            chunk = os.read(int(fd), 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(int(fd))
        values = json.loads(b"".join(chunks) or b"{}")
    except (OSError, ValueError) as exc:
        raise SecretError(f"{SECRETS_FD_VAR}={fd} is not a pipe of secrets this process inherited ({exc})") from None
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise SecretError(f"the pipe in {SECRETS_FD_VAR} does not hold name=value secrets")
    return values


def main(argv=None, environ=None):
    """`python secrets.py check`: report which keys are set or missing, by name only."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python secrets.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="report which provider keys and secrets are set")
    check.add_argument("--provider", action="append", choices=sorted(PROVIDERS),
                       help="a provider to check (repeatable; default: anthropic)")
    check.add_argument("--secret", action="append", default=[], metavar="NAME",
                       help=f"a variable for the agent's shell (repeatable; also ${SANDBOX_SECRETS_VAR})")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        extra = sandbox_secret_names(args.secret, environ)
    except SecretError as exc:
        print(f"secrets: {exc}", file=sys.stderr)
        return 2
    rows, problems, notes = [], [], []
    for key in args.provider or ["anthropic"]:
        p = PROVIDERS[key]
        # The check itself needs no SDK: a missing one is said apart (for the python that runs the runner to
        # have), and only what no install fixes here, a server that is not named, fails it.
        notes += filter(None, [sdk_problem(key)])
        problems += [line for line in provider_problems(key, environ) if line not in notes]
        if not p.env_var:
            rows.append({"name": None, "provider": key, "set": True, "from": None, "needed": False})
            continue
        source = next((v for v in (p.env_var, *p.alt_env_vars) if environ.get(v)), None)
        rows.append({"name": p.env_var, "provider": key, "set": source is not None or not p.required,
                     "from": source, "needed": p.required})
    for name in extra:
        rows.append({"name": name, "provider": None, "set": bool(environ.get(name)),
                     "from": name if environ.get(name) else None})
    ok = all(row["set"] for row in rows) and not problems
    if args.json:
        print(json.dumps({"ok": ok, "secrets": rows, "problems": problems, "notes": notes}))
    else:
        for row in rows:
            if row["name"] is None:
                print(f"{'(no key)':<24} {'not needed':<32} {row['provider']}")
                continue
            state = "set" if row["from"] == row["name"] else f"set (as {row['from']})"
            state = state if row["from"] else ("missing" if row["set"] is False else "not set (optional)")
            print(f"{row['name']:<24} {state:<32} {row['provider'] or '--secret'}")
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        for note in notes:
            print(f"note: {note} (in the environment that runs the runner; this check does not need it)",
                  file=sys.stderr)
        if not all(row["set"] for row in rows):
            names = [row["name"] for row in rows if not row["set"]]
            print(f"missing: export {' '.join(n + '=...' for n in names)}, or run `python runner.py start` "
                  "in a terminal to be asked", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
