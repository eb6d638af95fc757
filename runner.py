"""Stigmer local runner: an agent (Claude, OpenAI, Gemini, Ollama...) works in your workspace; every step
streams to a local daemon.

    python runner.py "make the failing test pass"         # run one task in the current directory
    git diff | python runner.py "review this"             # piped stdin joins the task as context
    python runner.py run "add a README" --workspace ~/proj --max-turns 20
    python runner.py --model openai/gpt-4.1 "fix the lint errors"   # or gemini/..., ollama/qwen3:8b
    python runner.py start --workers 2                    # daemon and workers in the background
    python runner.py list                                 # past runs, newest first
    python runner.py logs ex-1a2b3c -f                    # replay a run, then follow it
    STIGMER_SANDBOX=daytona python runner.py run "fix the test" --repo https://github.com/me/app
    python runner.py logs ex-1a2b3c --patch > change.patch   # what it changed, for git apply
    python runner.py resume ex-1a2b3c "now add a test"    # continue a run's conversation
    python runner.py -c "now add a test"                  # continue the latest run in this directory
    python runner.py --agent code-reviewer "review my change"   # .stigmer/agents/code-reviewer.yaml
    python runner.py agents                               # the agents found here, and their problems
    python runner.py stop

Configuration comes from the environment, read once here: STIGMER_MODE or MODE (local | cloud),
STIGMER_ENV or ENV (development | staging | production: logging only), STIGMER_HOME (~/.stigmer),
STIGMER_BACKEND_ENDPOINT (localhost:50051), SANDBOX_ROOT_DIR (the current directory),
STIGMER_MODEL (provider/model or a bare claude-/gpt-/gemini- name), the chosen provider's key
(ANTHROPIC_API_KEY, OPENAI_API_KEY or GEMINI_API_KEY: asked for with a masked prompt when missing; Ollama
needs none), base URLs (ANTHROPIC_BASE_URL, OPENAI_BASE_URL, GEMINI_BASE_URL, OLLAMA_HOST),
STIGMER_RUNNER_GRACE (15: seconds the daemon waits for a lost runner), STIGMER_SANDBOX (filesystem | daytona:
where commands run; daytona needs DAYTONA_API_KEY, and takes DAYTONA_API_URL, DAYTONA_TARGET, DAYTONA_SNAPSHOT),
STIGMER_CONTEXT_WINDOW (the model's context window in tokens, for clearing old tool results; default from
the table in models.py), STIGMER_AGENT (an agent's name or file, like --agent), STIGMER_SANDBOX_MODE
(workspace-write | read-only | full-access, like --sandbox-mode), STIGMER_SANDBOX_HIDE (more paths the agent's
commands never see, colon-separated). Cloud mode only: REDIS_URL, STIGMER_REDIS_PREFIX (stigmer:),
STIGMER_LEASE_TTL (15), STIGMER_CLAIM_IDLE (10), STIGMER_RETENTION (604800 seconds).

The agent's shell runs on this host confined by the OS (bubblewrap on Linux, Seatbelt on macOS): by default
it writes only the workspace and a private /tmp, has no network (--network) and cannot see your credentials
(~/.ssh, ~/.aws, ...) or STIGMER_HOME; --sandbox-mode full-access runs it as you, unconfined. It gets your
environment minus the model keys and variables that look secret (unless named with --secret, or
--inherit-env). File tools are confined to the workspace.
"""
import argparse
import os
import sys
from collections import namedtuple

import commands
from processes import RUN_IDLE_EXIT, CliError, project_secrets

# grpc (with daemon_client), stigmer_pb2 and terminal are imported where they are used: `--help` starts at once.
# The commands are in commands.py, the processes they start and find in processes.py.
MODES = ("local", "cloud")
NEEDED_MODULES = ("grpc", "google", "anthropic", "yaml")  # the core packages: missing, the python is not the venv's
SANDBOXES = ("filesystem", "daytona")  # STIGMER_SANDBOX: the host, or one Daytona sandbox per execution
ENVS = ("development", "staging", "production")
RUNNER_GRACE = 15.0  # default seconds the daemon waits for a lost runner to come back (STIGMER_RUNNER_GRACE)
INHERIT_ENV_VAR = "STIGMER_INHERIT_ENV"  # 1: the agent's shell gets secret-looking variables too (--inherit-env)
COMMANDS = ("run", "resume", "chat", "start", "stop", "status", "list", "logs", "cancel", "approve", "deny", "agents",
            "skills", "recover",
            "daemon", "worker")
LEADING_FLAGS = ("--json", "--verbose")  # flags without a value a user may type before the command word
USER_COMMANDS = ("status", "list", "logs", "start", "stop", "cancel", "approve", "deny", "run", "resume", "chat", "agents",
                 "skills", "recover",
                 "daemon", "worker")  # the order a near miss is matched in
REDIS_SETTINGS = (  # cloud mode: (variable, redis_backend setting, default seconds)
    ("STIGMER_LEASE_TTL", "lease_ttl", 15.0),  # a dead worker's execution fails about this long after
    ("STIGMER_CLAIM_IDLE", "claim_idle", 10.0),  # a queue entry read but never taken is reclaimed after
    ("STIGMER_RETENTION", "retention", 7 * 24 * 3600.0),  # finished executions and their logs are kept
)


def __getattr__(name):  # `runner.stigmer_secrets`, `runner.VERSION`: loaded when first asked for
    if name == "stigmer_secrets":
        return project_secrets()
    if name == "VERSION":
        from contract import VERSION
        return VERSION
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


class Daytona(namedtuple("Daytona", "api_key api_url target snapshot")):
    """Daytona settings: DAYTONA_API_KEY, DAYTONA_API_URL, DAYTONA_TARGET, DAYTONA_SNAPSHOT (None when unset)."""

    def __repr__(self):
        return (f"Daytona(api_key={'***' if self.api_key else None}, api_url={self.api_url!r}, "
                f"target={self.target!r}, snapshot={self.snapshot!r})")


class Config(namedtuple("Config", "mode env home endpoint sandbox_root model runner_grace environ sandbox daytona "
                                  "redis_url redis_prefix redis_settings context_window inherit_env warnings agent "
                                  "sandbox_mode sandbox_hide keep_warm",
                        defaults=("", "", {}, 0, False, (), "", "", (), 0.0))):
    """The configuration, read from the environment once at the entry point."""

    @staticmethod
    def load(environ):
        """Read and check the environment once; raises CliError on a bad value. An unknown ENV only warns
        (it sets log verbosity, and ENV is a generic name another tool may have set)."""
        from contract import DEFAULT_ENDPOINT, DEFAULT_HOME
        mode_var, mode = setting(environ, "MODE", "local")
        if mode not in MODES:
            raise CliError(f"{mode_var}={environ[mode_var]!r} is not a mode: "
                           f"use {mode_var}=local (the default) or {mode_var}=cloud", 2)
        env_var, env = setting(environ, "ENV", "development")
        warnings = []
        if env not in ENVS:
            warnings.append(f"{env_var}={environ[env_var]!r} is not one of {', '.join(ENVS)}: logging as development "
                            f"(set STIGMER_ENV to override an unrelated {env_var})")
            env = "development"
        home = os.path.abspath(os.path.expanduser(environ.get("STIGMER_HOME") or DEFAULT_HOME))
        sandbox = environ.get("STIGMER_SANDBOX", "").strip().lower() or ("daytona" if mode == "cloud" else "filesystem")
        if sandbox not in SANDBOXES:
            raise CliError(f"STIGMER_SANDBOX={environ['STIGMER_SANDBOX']!r} is not a sandbox: use filesystem "
                           "(commands on this host) or daytona (one Daytona sandbox per execution)", 2)
        daytona = Daytona(*(environ.get(f"DAYTONA_{name}", "").strip() or None
                            for name in ("API_KEY", "API_URL", "TARGET", "SNAPSHOT")))
        cfg = Config(mode=mode, env=env, home=home,
                      endpoint=environ.get("STIGMER_BACKEND_ENDPOINT") or DEFAULT_ENDPOINT,
                      sandbox_root=os.path.abspath(environ.get("SANDBOX_ROOT_DIR") or os.getcwd()),
                      model=environ.get("STIGMER_MODEL", ""),
                      runner_grace=seconds(environ, "STIGMER_RUNNER_GRACE", RUNNER_GRACE), environ=dict(environ),
                      sandbox=sandbox, daytona=daytona, context_window=tokens(environ, "STIGMER_CONTEXT_WINDOW"),
                      inherit_env=environ.get(INHERIT_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"),
                      warnings=tuple(warnings), agent=environ.get("STIGMER_AGENT", "").strip(),
                      keep_warm=seconds(environ, "STIGMER_KEEP_WARM", RUN_IDLE_EXIT),  # see processes.keep_warm
                      **confinement_settings(environ, home))
        return cfg._replace(**cloud_settings(environ)) if mode == "cloud" else cfg

    def require_sandbox(self):
        """Raise CliError unless the chosen sandbox can be used: Daytona needs its key and its SDK."""
        if self.sandbox != "daytona":
            return
        why = "MODE=cloud runs commands in Daytona sandboxes" if self.mode == "cloud" and \
            not self.environ.get("STIGMER_SANDBOX") else "STIGMER_SANDBOX=daytona runs commands in Daytona sandboxes"
        if not self.daytona.api_key:
            raise CliError(f"{why} and needs DAYTONA_API_KEY: export it (make one in the Daytona dashboard, under "
                           "Keys), or set STIGMER_SANDBOX=filesystem to run commands on this host", 2)
        import importlib.util
        if importlib.util.find_spec("daytona") is None:
            raise CliError(f"{why} and needs the daytona SDK: pip install -e '.[cloud]'", 2)

    @property
    def cloud(self):
        return self.mode == "cloud"


def confinement_settings(environ, home):
    """STIGMER_SANDBOX_MODE ("" when unset: the run's default) and what the agent's commands never see: the user's
    credentials (sandbox.HIDDEN_IN_HOME under HOME), STIGMER_HOME (HOME_DIR) with the daemon's token, and the
    colon-separated paths of STIGMER_SANDBOX_HIDE (absolute, or under ~)."""
    import sandbox
    mode = environ.get("STIGMER_SANDBOX_MODE", "").strip().lower()
    if mode and mode not in sandbox.SANDBOX_MODES:
        raise CliError(f"STIGMER_SANDBOX_MODE={environ['STIGMER_SANDBOX_MODE']!r} is not a sandbox mode: use "
                       "workspace-write (the default), read-only or full-access", 2)
    user_home = environ.get("HOME") or os.path.expanduser("~")
    extra = []
    for part in environ.get("STIGMER_SANDBOX_HIDE", "").split(":"):
        path = part.strip()
        if path == "~" or path.startswith("~/"):
            path = user_home + path[1:]
        if path and not os.path.isabs(path):
            raise CliError(f"STIGMER_SANDBOX_HIDE: {part.strip()!r} is not an absolute path: give absolute paths "
                           "(or ~/...), separated by colons, e.g. STIGMER_SANDBOX_HIDE=~/.config/gh:/srv/keys", 2)
        if path:
            extra.append(os.path.normpath(path))
    hide = [*sandbox.credential_paths(user_home), home, os.path.join(home, "daemon.token"), *extra]
    return dict(sandbox_mode=mode, sandbox_hide=tuple(dict.fromkeys(hide)))


def setting(environ, name, default):
    """(variable, lowercased value) of STIGMER_NAME, else NAME, else DEFAULT: the prefixed name wins."""
    for var in (f"STIGMER_{name}", name):
        value = environ.get(var, "").strip().lower()
        if value:
            return var, value
    return name, default


def cloud_settings(environ):
    """Cloud mode's settings (only ever read in cloud mode); one CliError naming everything missing."""
    import importlib.util
    missing = []
    url = environ.get("REDIS_URL", "").strip()
    if not url:
        missing.append("REDIS_URL (redis://[:PASSWORD@]HOST:PORT/DB, or rediss:// for TLS)")
    elif not url.startswith(("redis://", "rediss://")):
        raise CliError(f"REDIS_URL must start with redis:// or rediss://, not {url.split('://')[0]!r}:// "
                       "(e.g. REDIS_URL=redis://:PASSWORD@redis.internal:6379/0)", 2)
    sandbox = environ.get("STIGMER_SANDBOX", "").strip().lower() or "daytona"
    if sandbox not in SANDBOXES:
        raise CliError(f"STIGMER_SANDBOX={environ['STIGMER_SANDBOX']!r} is not a sandbox: use "
                       "STIGMER_SANDBOX=daytona (the cloud default) or STIGMER_SANDBOX=filesystem", 2)
    # DAYTONA_API_KEY is needed only where commands run (run, start, worker: Config.require_sandbox), so that
    # status, list, logs and cancel work from any host with REDIS_URL alone.
    if importlib.util.find_spec("redis") is None:
        missing.append("the redis package (pip install -e '.[cloud]')")
    if missing:
        raise CliError("MODE=cloud needs " + "; ".join(missing), 2)
    prefix = environ.get("STIGMER_REDIS_PREFIX", "").strip() or "stigmer:"
    settings = {name: seconds(environ, var, default) for var, name, default in REDIS_SETTINGS}
    if settings["lease_ttl"] < 0.3:
        raise CliError("STIGMER_LEASE_TTL must be at least 0.3 seconds (heartbeats go every third of it)", 2)
    return dict(sandbox=sandbox, redis_url=url, redis_prefix=prefix, redis_settings=settings)


def seconds(environ, name, default):
    """ENVIRON[NAME] as a number of seconds, DEFAULT when unset; raises CliError when it is not one."""
    value = environ.get(name) or str(default)
    try:
        if 0 <= float(value) < float("inf"):
            return float(value)
    except ValueError:
        pass
    raise CliError(f"{name}={value!r} is not a number of seconds: use, for example, {name}={default:g}", 2)


def tokens(environ, name):
    """ENVIRON[NAME] as a positive number of tokens, 0 when unset; raises CliError when it is not one."""
    value = environ.get(name, "").strip().replace("_", "")
    if not value:
        return 0
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise CliError(f"{name}={environ[name]!r} is not a number of tokens: use, for example, {name}=200000", 2)


DAEMON_EXAMPLES = """examples (python daemon.py takes the same arguments):
  STIGMER_HOME=/tmp/st python runner.py daemon --endpoint 127.0.0.1:50052   # state elsewhere, another port
  STIGMER_RUNNER_GRACE=60 python runner.py daemon --endpoint 0.0.0.0:50051 --allow-remote   # from other machines"""


def parser():
    p = argparse.ArgumentParser(prog="stigmer", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:4]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # What `run` and `resume` both take: the run's limits, secrets, output and confinement.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--max-turns", type=int, default=50, help="most model turns (default 50)")
    shared.add_argument("--max-tokens-total", type=int, help="stop after this many tokens in all")
    shared.add_argument("--secret", action="append", metavar="NAME",
                        help="pass env var NAME to the agent's shell, redacted")
    shared.add_argument("--inherit-env", action="store_true",
                        help=f"let variables that look secret (names with KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL) "
                             f"reach the agent's shell, still redacted (or {INHERIT_ENV_VAR}=1)")
    shared.add_argument("--json", action="store_true",
                        help="JSON lines: a run object, one object per event, then a summary object")
    shared.add_argument("--detach", action="store_true", help="submit to the background daemon and print the id")
    shared.add_argument("--sandbox-mode", choices=("workspace-write", "read-only", "full-access"),
                        help="how the agent's commands are confined: workspace-write (the default: they write only "
                             "the workspace and /tmp, no network, credentials hidden), read-only, or full-access "
                             "(unconfined, as you); or STIGMER_SANDBOX_MODE (resume: default the execution's)")
    shared.add_argument("--network", action="store_true",
                        help="let the agent's commands use the network (off in workspace-write and read-only)")
    shared.add_argument("--verbose", action="store_true", help="show each tool's output whole, not its first lines")
    shared.add_argument("--no-patch", action="store_true",
                        help="record no patch of what the run changes in a git workspace (`logs ID --patch`)")

    run = sub.add_parser("run", help="run a task (the default command)", parents=[shared],
                         epilog='examples:\n  python runner.py run "fix the failing test" --workspace ~/proj\n'
                                '  python runner.py run --agent code-reviewer --env REVIEW_STYLE=thorough "review it"',
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("task", nargs="*", help="what the agent should do; `-` or none reads it from stdin "
                                             "(piped stdin after a task is added as context)")
    run.add_argument("--workspace", help="directory the agent works in (default: SANDBOX_ROOT_DIR or .)")
    run.add_argument("--model", help="provider/model, e.g. openai/gpt-4.1, gemini/gemini-2.5-flash, ollama/qwen3:8b "
                                     "(default: STIGMER_MODEL or the newest Claude Sonnet)")
    run.add_argument("--repo", metavar="URL", help="clone this git repository into the sandbox's workspace first "
                                                   "(STIGMER_SANDBOX=daytona; a --secret GITHUB_TOKEN authenticates it)")
    run.add_argument("--ref", help="the branch, tag or commit of --repo to check out")
    run.add_argument("--keep-sandbox", action="store_true",
                     help="leave the Daytona sandbox running when the run ends, and print its id")
    run.add_argument("-c", "--continue", dest="cont", action="store_true",
                     help="continue the conversation of the latest execution in this workspace")
    run.add_argument("--agent", metavar="NAME_OR_PATH",
                     help="the agent to run: a name (.stigmer/agents/NAME.yaml here or up to the git root, then "
                          "$STIGMER_HOME/agents/NAME.yaml) or a file (default: STIGMER_AGENT, else the built-in one)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="a non-secret variable for the agent's shell (recorded in the log): one the agent "
                          "declares, or any other")
    run.add_argument("--no-project-doc", action="store_true",
                     help="leave the project's AGENTS.md / CLAUDE.md and $STIGMER_HOME/AGENTS.md out of the system prompt")
    run.add_argument("--approval", choices=("never", "on-write", "always"),
                     help="ask before acting: on-write (commands not known to be read-only, writes, MCP tools) or "
                          "always; default STIGMER_APPROVAL, the settings files, else never")
    run.add_argument("--allow", action="append", metavar="RULE",
                     help="never ask about this: a command's first words (git commit), a path glob (Write(src/**)), "
                          "an MCP tool (mcp__github__*); repeatable")
    run.add_argument("--deny", action="append", metavar="RULE",
                     help="refuse this under every policy (same rules as --allow); repeatable")
    run.add_argument("--approval-timeout", type=float, metavar="SECONDS",
                     help="deny a call nobody answered after this long (default: 600 in the foreground, none detached)")
    run.add_argument("--mcp-config", metavar="FILE",
                     help="start the MCP servers in FILE ({\"mcpServers\": {NAME: {...}}}, as Claude Code's .mcp.json) "
                          "and offer their tools as mcp__NAME__TOOL; an agent's named servers are looked up there too")
    run.add_argument("--no-skills", action="store_true",
                     help="offer no Agent Skills (.agents/skills, .claude/skills, ~/.agents/skills ...; see `skills`)")

    resume = sub.add_parser("resume", help="continue an execution's conversation with a follow-up", parents=[shared],
                            epilog='example: python runner.py resume ex-1a2b3c "now add a test for it"')
    resume.add_argument("id", help="the execution to continue (it must have ended)")
    resume.add_argument("task", nargs="*", help="the follow-up; `-` or none reads it from stdin")
    resume.add_argument("--model", help="model id (default: the one the execution used); another provider's is fine")
    resume.set_defaults(workspace=None, cont=False, repo=None, ref=None, keep_sandbox=False, agent=None, env=None,
                        no_project_doc=False, no_skills=False, mcp_config=None, approval=None, allow=None, deny=None,
                        approval_timeout=None)

    chat = sub.add_parser("chat", help="a session: each line is a run that continues the conversation "
                                       "(also: stigmer alone on a terminal)", parents=[shared],
                          epilog="in the session: Ctrl-C cancels the current turn, /new starts a fresh conversation, "
                                 "/exit or Ctrl-D leaves", formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("--workspace", help="directory the agent works in (default: SANDBOX_ROOT_DIR or .)")
    chat.add_argument("--model", help="provider/model (default: STIGMER_MODEL or the newest Claude Sonnet)")
    chat.add_argument("--agent", metavar="NAME_OR_PATH", help="the agent to run (default: STIGMER_AGENT)")
    chat.add_argument("--no-skills", action="store_true", help="offer no Agent Skills")
    chat.add_argument("--mcp-config", metavar="FILE", help="start the MCP servers in FILE (see run --help)")
    chat.add_argument("--approval", choices=("never", "on-write", "always"), help="ask before acting (see run --help)")
    chat.set_defaults(allow=None, deny=None, approval_timeout=None)
    chat.set_defaults(task=[], cont=False, repo=None, ref=None, keep_sandbox=False, env=None, no_project_doc=False)

    start = sub.add_parser("start", help="run the daemon and workers in the background",
                           epilog="example: python runner.py start --workers 2")
    start.add_argument("--workers", type=int, default=1, help="how many workers (default 1)")
    start.add_argument("--secret", action="append", metavar="NAME", help="a secret the workers' shells may see")
    start.add_argument("--model", help="the workers' default model, provider/model (its key is asked for)")
    stop = sub.add_parser("stop", help="stop the background daemon and workers (running executions are cancelled)",
                          epilog="example: python runner.py stop --force")
    stop.add_argument("--force", action="store_true", help="cancel running executions without asking")
    status = sub.add_parser("status", help="report on the daemon and workers",
                            epilog="example: python runner.py status --json")
    status.add_argument("--json", action="store_true", help="one JSON object")
    lst = sub.add_parser("list", help="list executions, newest first", epilog="example: python runner.py list --phase failed")
    lst.add_argument("--json", action="store_true", help="one JSON object per execution per line")
    lst.add_argument("--phase", choices=["pending", "running", "completed", "failed", "cancelled"])
    lst.add_argument("--limit", type=int, default=20)
    logs = sub.add_parser("logs", help="replay an execution's events", epilog="example: python runner.py logs ex-1a2b -f")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until it ends")
    logs.add_argument("--full", action="store_true", help="show each tool's output whole, not its first lines")
    logs.add_argument("--json", action="store_true", help="one JSON object per event per line")
    logs.add_argument("--history", action="store_true",
                      help="show the conversation it continues first (its parent's events, and theirs)")
    logs.add_argument("--patch", action="store_true",
                      help="print the change the agent made, for git apply: logs ID --patch > change.patch")
    recover = sub.add_parser("recover", help="move a damaged database aside and keep what can still be read",
                             epilog="example: python runner.py stop && python runner.py recover")
    recover.add_argument("--json", action="store_true", help="one JSON object")
    cancel = sub.add_parser("cancel", help="cancel an execution", epilog="example: python runner.py cancel ex-1a2b")
    cancel.add_argument("id")
    approve = sub.add_parser("approve", help="approve a tool call waiting for approval (see run --approval)",
                             epilog="examples:\n  python runner.py approve ex-1a2b\n  python runner.py approve ex-1a2b "
                                    "--always   # and every call like it, for the rest of the run",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    approve.add_argument("id", help="the execution")
    approve.add_argument("--always", action="store_true",
                         help="approve calls like this one for the rest of the execution and its resumes")
    approve.add_argument("--request", default="", metavar="REQUEST_ID",
                         help="which question (its id, in `logs --json`); needed when several wait")
    deny = sub.add_parser("deny", help="deny a tool call waiting for approval; the agent gets REASON",
                          epilog='example: python runner.py deny ex-1a2b "not on main: use a branch"')
    deny.add_argument("id", help="the execution")
    deny.add_argument("reason", nargs="*", help="why (the model reads it)")
    deny.add_argument("--request", default="", metavar="REQUEST_ID",
                      help="which question (its id, in `logs --json`); needed when several wait")
    agents = sub.add_parser("agents", help="list the agents this workspace can use (name, description, file, "
                                           "problems); `agents show NAME` prints one",
                            epilog="examples:\n  python runner.py agents\n  python runner.py agents --json\n"
                                   "  python runner.py agents show code-reviewer\n"
                                   "  python runner.py agents show ./my-agent.yaml --json",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    agents.add_argument("--json", action="store_true", help="one JSON object per agent per line")
    agents.add_argument("--workspace", help="look up from this directory (default: SANDBOX_ROOT_DIR or .)")
    agents_sub = agents.add_subparsers(dest="agents_command", metavar="show")
    show = agents_sub.add_parser("show", help="print an agent as it resolves (secret values are never shown)",
                                 epilog="example: python runner.py agents show code-reviewer")
    show.add_argument("name", metavar="NAME_OR_PATH", help="an agent's name, or the path of an agent file")
    show.add_argument("--json", dest="show_json", action="store_true", help="one JSON object")
    show.add_argument("--workspace", dest="show_workspace",
                      help="look up from this directory (default: SANDBOX_ROOT_DIR or .)")
    skl = sub.add_parser("skills", help="list the Agent Skills a run here would offer, and those skipped",
                         epilog="examples:\n  python runner.py skills\n  python runner.py skills --json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    skl.add_argument("--json", action="store_true", help="one JSON object per skill per line")
    skl.add_argument("--workspace", help="look up from this directory (default: SANDBOX_ROOT_DIR or .)")
    dmn = sub.add_parser("daemon", help="run the daemon in the foreground (also: python daemon.py)",
                         epilog=DAEMON_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dmn.add_argument("--endpoint", metavar="HOST:PORT",
                     help="where to listen (default: STIGMER_BACKEND_ENDPOINT or localhost:50051)")
    dmn.add_argument("--allow-remote", action="store_true", help="allow a non-loopback endpoint")
    dmn.add_argument("--idle-exit", type=float, default=0, help=argparse.SUPPRESS)  # a foreground run's daemon
    wrk = sub.add_parser("worker", help="run a worker in the foreground",
                         epilog="example: ANTHROPIC_API_KEY=... python runner.py worker --capacity 4")
    wrk.add_argument("--capacity", type=int, default=2, help="executions at once (default 2)")
    wrk.add_argument("--model", help="default model, provider/model (default: STIGMER_MODEL)")
    wrk.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    wrk.add_argument("--secret", action="append", metavar="NAME",
                     help="a provider key an execution may pass to its shell (other secrets need no flag)")
    wrk.add_argument("--inherit-env", action="store_true",
                     help="executions may pass every variable to their shell (run --inherit-env)")
    wrk.add_argument("--runner-id", help=argparse.SUPPRESS)  # a foreground run's own worker: its id ...
    wrk.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)  # ... and it takes only that run's
    wrk.add_argument("--warm-for", type=float, default=0, help=argparse.SUPPRESS)  # ... or, told so, stays warm
    wrk.add_argument("--preload-mcp", action="store_true", help=argparse.SUPPRESS)  # its run has MCP servers
    wrk.add_argument("--warm-print", default="", help=argparse.SUPPRESS)  # ... for runs of the same environment
    return p


def main(argv=None):
    """The CLI; returns the exit code. From the command line (ARGV None) it exits the process itself."""
    if argv is None:
        if os.path.basename(sys.argv[0]) == "stigmer":  # the console script: hints say `stigmer …`
            import contract
            contract.PROG = "stigmer"
        code = run_cli(sys.argv[1:])
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(code)  # every file is flushed and closed by now; skip the gRPC runtime's ~50 ms teardown
    return run_cli(argv)


def run_cli(argv):
    """Parse ARGV and run the command; returns the exit code."""
    args = list(argv)
    lead = next((n for n, a in enumerate(args) if a not in LEADING_FLAGS), len(args))
    if 0 < lead < len(args) and args[lead] in COMMANDS:  # `stigmer --json resume ID "more"`: the command first
        args = [args[lead], *args[:lead], *args[lead + 1:]]
    implicit_run = bool(args) and args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")
    if implicit_run:
        args.insert(0, "run")
    p = parser()
    if not args:
        # `echo "task" | python runner.py`: the prompt comes from stdin; alone on a terminal: a session
        args = ["run"] if not sys.stdin.isatty() else ["chat"]
    try:
        parsed = p.parse_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    from contract import VERSION, BackendError, as_typed  # after `--help`, which needs neither
    if parsed.version:
        print(f"stigmer {VERSION}")
        return 0
    handler = getattr(commands, "cmd_" + ("run" if parsed.command == "resume" else parsed.command))
    try:
        if implicit_run and "--" not in args:
            refuse_near_miss(parsed.task)
        cfg = Config.load(commands.worker_environ(parsed) if parsed.command == "worker" else os.environ)
        for warning in cfg.warnings:
            print(f"stigmer: warning: {warning}", file=sys.stderr)
        return handler(cfg, parsed)
    except CliError as exc:
        return failed(parsed, as_typed(str(exc)), exc.code)
    except BackendError as exc:
        return failed(parsed, as_typed(str(exc)), 1)
    except ModuleNotFoundError as exc:
        if exc.name not in NEEDED_MODULES:
            raise
        print(f"stigmer: the {exc.name} package is not installed for {sys.executable}: activate the project's "
              "virtual environment (. .venv/bin/activate) or run .venv/bin/stigmer", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stigmer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


def failed(parsed, message, code):
    """Say MESSAGE on stderr (one `stigmer:` line) and return CODE; with --json, also one JSON object on stdout
    (`"kind": "error"`), so that a script reading stdout learns why there is nothing else."""
    print(f"stigmer: {message}", file=sys.stderr)
    if getattr(parsed, "json", False) or getattr(parsed, "show_json", False):
        import json
        print(json.dumps({"kind": "error", "message": message, "exit_code": code}), flush=True)
    return code


def refuse_near_miss(task):
    """Raise a usage error when TASK is one word that looks like a mistyped command (`stauts`, `lst`):
    running it would cost a model call. `run WORD` or `-- WORD` runs such a task on purpose."""
    words = " ".join(task).split()
    if len(words) != 1:
        return
    if words[0] in USER_COMMANDS:  # `stigmer --json list`: an option before the command
        raise CliError(f"did you mean `{words[0]}`? (it is a command: put it before its options, as in "
                       f"`python runner.py {words[0]} --json`; to run it as a task, use "
                       f"`python runner.py run {words[0]}`)", 2)
    command = near_miss(words[0])
    if command:
        raise CliError(f"did you mean `{command}`? (`{words[0]}` is not a command; to run it as a task, use "
                       f"`python runner.py run {words[0]}` or `python runner.py -- {words[0]}`)", 2)


def near_miss(word):
    """The command WORD is a prefix of or within edit distance 2 of, closest first; else None."""
    word = word.lower()
    if not word.isidentifier():
        return None
    scored = sorted((0 if command.startswith(word) else edit_distance(word, command), n, command)
                    for n, command in enumerate(USER_COMMANDS))
    distance, _, command = scored[0]
    return command if distance <= 2 else None


def edit_distance(a, b):
    """Levenshtein distance, with a swap of two neighbours counted as one edit (`stauts`)."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


if __name__ == "__main__":
    sys.exit(main())
