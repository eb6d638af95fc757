"""The CLI's commands: `run` (and `resume`), `start`, `stop`, `status`, `list`, `logs`, `cancel`,
`daemon` and `worker`, each `cmd_NAME(cfg, args)` returning the exit code or raising CliError.

    runner.main(["run", "add a README", "--workspace", "/tmp/proj"])   # parses, then calls cmd_run

They reach the backend through the mode's client only (processes.connect: the daemon, or Redis).
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import time

from processes import (RUN_IDLE_EXIT, START_WAIT, CliError, allowed_args, backend, backend_is_terminal, connect,
                       daemon_owner, environment_print, gather_secrets, known_secrets, live_pid, pid_files,
                       project_secrets, release_worker, spawn, spawn_run_worker, stop_pid, warm_marker, worker_env)

EXIT_CODES = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 130}
REMOTE_SKILL = "/home/daytona/.agents/skills/{}/SKILL.md"  # about where a Daytona sandbox's worker puts a skill
PROMPT_CHARS_SURELY_FINE = (1 << 20) // 4  # characters that fit contract.MAX_PROMPT_BYTES whatever they are


def choose_model(cfg, name):
    """NAME (--model), else STIGMER_MODEL, else the default, as provider/model; checks that this runner can use
    its provider (SDK installed, base URL given). Raises CliError with what to do."""
    import models
    try:
        model = models.qualified(name or cfg.model)
        models.check_provider(model.split("/")[0], cfg.environ)
    except models.ModelError as exc:
        raise CliError(exc.message, 2) from None
    return model


def read_prompt(task, stdin):
    """The prompt: the TASK words; `-` or no task reads it from STDIN (when that is not a terminal);
    a task with piped STDIN gets the piped text appended as context, as `llm` does."""
    words = list(task)
    from_stdin = words == ["-"] or (not words and not stdin.isatty())
    piped = "" if from_stdin or stdin.isatty() or not readable_pipe(stdin) else stdin.read()
    if from_stdin:
        prompt = stdin.read().strip()
    else:
        prompt = " ".join(words).strip()
        if prompt and piped.strip():
            prompt = f"{prompt}\n\n{piped.rstrip()}"
    if not prompt:
        raise CliError("the prompt is empty: give the task, e.g. python runner.py \"add a --verbose flag\", "
                       "or pipe it in: echo \"add a --verbose flag\" | python runner.py", 2)
    if len(prompt) > PROMPT_CHARS_SURELY_FINE:  # before any key prompt, worker or daemon
        from contract import prompt_problem  # (grpc: not imported for the usual prompt)
        if prompt_problem(prompt):
            raise CliError(prompt_problem(prompt), 2)
    return prompt


def readable_pipe(stream):
    """True when STREAM is a pipe or a file (something piped or redirected in), not /dev/null or a socket."""
    import stat
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def cmd_run(cfg, args):
    """`run` and `resume`: plan the run, start what is missing (the backend, this run's worker), submit, follow."""
    plan = plan_run(cfg, args)
    be = backend(cfg)
    found = be.find()
    if args.detach and (found is None or found[1].connected_runners == 0):
        # a detached run needs a backend and a worker that outlive this command
        cmd_start(cfg, argparse.Namespace(workers=1, secret=plan.names, model=plan.model, inherit_env=plan.inherit),
                  out=sys.stderr, labels=plan.labels)
        found = be.find()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    worker, ended = None, False

    def taker_in(found):  # who takes the run at once, for the plan's secret names (a parent adds to them)
        return be.warm_worker(found, plan.model, plan.shell_names, environment_print(cfg, plan.shell_names, plan.model))
    try:
        # After `start`, a warm worker with a free slot, this run's provider and secrets takes the run at once
        # (its SDK is loaded, its key was asked for at `start`); else the run's own worker takes only this run.
        # That worker (its SDK import is the slowest part of a cold start) starts before the daemon, unless it
        # needs the secret names of the run it resumes, which only the log knows.
        # A warm worker a foreground run left behind takes it too, pinned to it (see processes.keep_warm).
        taker = None if args.detach or plan.resuming else taker_in(found)
        own = not args.detach and taker is None
        runner_id = f"run-{os.getpid()}-{os.urandom(3).hex()}" if own else taker or ""
        endpoint = be.worker_endpoint(found) if own and not plan.resuming else None
        if endpoint:
            worker = run_worker(cfg, plan, endpoint, runner_id)
        client, status = found or be.ensure(idle_exit=RUN_IDLE_EXIT)
        if plan.resuming:  # a follow-up: the parent's secrets known, a warm worker that holds them takes it too
            continue_parent(cfg, args, plan, find_parent(client, args, plan.workspace))
            taker = taker_in((client, status))
            if taker is not None:
                own, runner_id = False, taker
        if own and worker is None:
            worker = run_worker(cfg, plan, be.worker_endpoint((client, status)), runner_id)
        spec = execution_spec(cfg, args, plan, runner_id, getattr(worker, "secrets", ()))
        queued = 0 if runner_id else (status or client.status()).queue_depth
        if queued:
            from contract import as_typed
            print(as_typed(f"stigmer: {queued} older execution(s) are queued and run first: see `python runner.py "
                           "list --phase pending`, and `python runner.py cancel ID` to drop one"), file=sys.stderr)
        execution = client.submit(spec)
        args.execution_id = execution.id  # for the session (cmd_chat), which continues it next
        if args.detach:
            print(json.dumps({"execution_id": execution.id}) if args.json else execution.id)
            return 0
        code = follow_run(cfg, be, client, execution, plan, args)
        ended = code == 0  # it completed (its key works): its worker may stay warm for the next run
        return code
    finally:
        for sig in handlers:  # let the clean-up below finish
            signal.signal(sig, signal.SIG_IGN)
        if worker is not None:
            release_worker(worker, ended)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def cmd_chat(cfg, args):
    """`chat` (or the CLI alone on a terminal): a session. Each line is a run (an execution in the log like any
    other) that continues the session's conversation; Ctrl-C cancels the current turn and comes back to the
    prompt; /new starts a fresh conversation; /exit or Ctrl-D leaves."""
    if not sys.stdin.isatty():
        raise CliError("chat needs a terminal: give the task instead, e.g. python runner.py \"add a --verbose flag\"", 2)
    if args.json or args.detach:
        raise CliError("chat is for a person at a terminal: drop --json and --detach (run them per task)", 2)
    print("stigmer chat · each line is a task that continues the conversation · Ctrl-C cancels a turn · "
          "/new starts afresh · /exit or Ctrl-D leaves", file=sys.stderr)
    parent = None
    while True:
        try:
            line = input("› ").strip()
        except EOFError:  # Ctrl-D: the session ends well, whatever its last turn did
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print(file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/new":
            parent = None
            print("stigmer: a fresh conversation starts with the next line", file=sys.stderr)
            continue
        if not line:
            continue
        turn = argparse.Namespace(**{**vars(args), "task": [line], "command": "resume" if parent else "run",
                                     "id": parent, "execution_id": None})
        if parent:  # the conversation keeps its agent and settings
            turn.agent, turn.env = None, None
        try:
            cmd_run(cfg, turn)  # its outcome is on the screen; the session goes on
        except CliError as exc:
            print(f"stigmer: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
        parent = turn.execution_id or parent
        print(file=sys.stderr)


def plan_run(cfg, args):
    """What a run needs before any backend is reached, every problem a CliError first: the prompt, workspace,
    secret names, agent, model, project docs and confinement (a resumed run takes more from its parent later)."""
    workspace = os.path.abspath(os.path.expanduser(args.workspace)) if args.workspace else cfg.sandbox_root
    if not os.path.isdir(workspace):
        raise CliError(f"the workspace {workspace} does not exist (or is not a directory)", 2)
    prompt = read_prompt(args.task, sys.stdin)
    resuming = args.command == "resume" or args.cont
    if args.max_turns < 1:
        raise CliError(f"--max-turns must be at least 1 (got {args.max_turns})", 2)
    if (args.max_tokens_total or 0) < 0:
        raise CliError(f"--max-tokens-total must be positive (got {args.max_tokens_total})", 2)
    check_repo_args(cfg, args)
    cfg.require_sandbox()
    mod = project_secrets()
    try:
        names = mod.sandbox_secret_names(args.secret or (), cfg.environ)
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None
    agent = plan_agent(cfg, args, workspace, resuming)  # resuming: the parent's, once it is known
    names = list(dict.fromkeys([*names, *agent_secrets(agent)]))  # declared secrets travel like --secret
    sandbox_mode = args.sandbox_mode or cfg.sandbox_mode  # "": the default, or the parent's when resuming
    network = args.network or bool(agent is not None and agent.config.network)
    if not resuming:  # resuming: once the parent is known
        sandbox_mode, network = confinement(cfg, sandbox_mode, network)
    model = choose_model(cfg, args.model or (agent.config.model if agent else ""))
    plan = argparse.Namespace(
        prompt=prompt, workspace=workspace, resuming=resuming, agent=agent, labels=agent_labels(agent),
        model=model, parent=None, docs=project_docs(cfg, args, workspace, resuming),
        skills=plan_skills(cfg, args, workspace, agent, model, resuming), sandbox_mode=sandbox_mode, network=network,
        inherit=args.inherit_env or cfg.inherit_env)
    settle_names(plan, names)
    plan.mcp = plan_mcp(cfg, args, agent, plan.names, resuming)
    plan.approval = plan_approval(cfg, args, workspace, agent, resuming)
    return plan


def settle_names(plan, names):
    """PLAN's secret names (NAMES without `*`), whether every variable may reach the shell (`*` among NAMES
    asks that too), and the spec's secret_names, which say both."""
    mod = project_secrets()
    plan.inherit = plan.inherit or mod.INHERIT_ALL in names
    plan.names = [n for n in dict.fromkeys(names) if n != mod.INHERIT_ALL]
    plan.shell_names = plan.names + [mod.INHERIT_ALL] if plan.inherit else plan.names


def continue_parent(cfg, args, plan, parent):
    """PLAN continues PARENT's conversation where it was: its workspace, secrets, agent and sandbox mode, and
    its model unless --model named another (whose provider's key is the one to gather)."""
    plan.parent, plan.workspace = parent, parent.spec.workspace
    settle_names(plan, [*parent.spec.secret_names, *plan.names])
    if not args.model:
        plan.model = choose_model(cfg, parent.spec.model)
    plan.skills = list(parent.spec.skills)  # its catalogue is in the system prompt the conversation keeps
    if getattr(args, "mcp_config", None):
        raise CliError("a continued conversation keeps its MCP servers: drop --mcp-config (or start a new run)", 2)
    plan.mcp = list(parent.spec.mcp_servers)  # its tools are in the requests the conversation repeats
    if plan.approval is None:  # no approval flag: the conversation keeps its policy
        plan.approval = parent.spec.approval
    if parent.spec.HasField("agent"):  # its secrets are in secret_names already
        plan.agent, plan.labels = parent.spec.agent, agent_labels(parent.spec.agent)
    plan.sandbox_mode, plan.network = confinement(cfg, plan.sandbox_mode, plan.network, parent)


def run_worker(cfg, plan, endpoint, runner_id):
    """PLAN's own worker, dialling ENDPOINT, taking only executions pinned to RUNNER_ID."""
    return spawn_run_worker(cfg, plan.names, endpoint, runner_id, plan.model, plan.labels, plan.inherit,
                            mcp=bool(getattr(plan, "mcp", None)))


def execution_spec(cfg, args, plan, runner_id, gathered):
    """The pb.ExecutionSpec PLAN submits (RUNNER_ID: the worker it is pinned to), its prompt with the secret values
    this CLI knows (GATHERED: those typed for its worker among them) redacted."""
    import stigmer_pb2 as pb
    parent = plan.parent
    return pb.ExecutionSpec(
        prompt=redact_prompt(known_secrets(cfg, plan.names, gathered), plan.prompt), workspace=plan.workspace,
        model=plan.model, max_turns=args.max_turns, secret_names=plan.shell_names,
        max_tokens_total=args.max_tokens_total or 0, runner_id=runner_id,
        repo=args.repo or (parent.spec.repo if parent else ""), ref=args.ref or (parent.spec.ref if parent else ""),
        keep_sandbox=args.keep_sandbox, sandbox=cfg.sandbox, parent_id=parent.id if parent else "", agent=plan.agent,
        project_docs=plan.docs, sandbox_mode=plan.sandbox_mode, network=plan.network, no_patch=args.no_patch,
        skills=plan.skills, mcp_servers=plan.mcp, approval=plan.approval)


def follow_run(cfg, be, client, execution, plan, args):
    """Show EXECUTION live until it ends (Ctrl-C cancels it) and its summary; returns the exit code."""
    import stigmer_pb2 as pb
    import terminal
    from contract import BackendError, BackendUnavailable
    renderer = terminal.make_renderer(args.json, cfg.environ.get("NO_COLOR"))
    renderer.full = args.verbose
    if renderer.json_lines:
        renderer.json_line(terminal.run_dict(execution, cfg.mode, client.endpoint))
    else:
        space = plan.workspace if cfg.sandbox == "filesystem" else \
            "daytona sandbox" + (f" · {execution.spec.repo}" if execution.spec.repo else "")
        continues = f" · continues {plan.parent.id}" if plan.parent else ""
        who = f" · agent {plan.agent.name}" if plan.agent is not None and plan.agent.name else ""
        renderer.out(renderer.paint("2", f"stigmer · {cfg.mode} · {be.where(client)} · {space} · {plan.model}{who}"
                                         f"{terminal.sandbox_part(execution.spec)} · {execution.id}{continues}")
                     + "\n", err=True)
    started = time.monotonic()

    def cancel():
        try:
            be.connect().cancel(execution.id)  # the daemon may have restarted with a new token
        except BackendError as exc:
            print(f"stigmer: could not cancel {execution.id}: {exc}", file=sys.stderr)

    def restarted():
        try:
            return be.ensure(idle_exit=RUN_IDLE_EXIT)[0]
        except CliError as exc:  # it cannot start now: the follower waits, and says what brings it back
            raise BackendUnavailable(f"{exc}; `python runner.py start` brings it back") from None

    if sys.stdin.isatty():  # the foreground terminal answers approval requests as they come
        questions = ApprovalQuestions(be, renderer)
        renderer.on_request, renderer.on_answer = questions.request, questions.answered
    interrupted = terminal.cancel_on_signals(cancel)  # cmd_run restores the handlers
    try:
        # A lost daemon is started again (the same lock-guarded start every command uses): the run's worker
        # reconnects to it and resends what it holds, and the run ends with the execution's real outcome.
        phase = terminal.follow(client, execution.id, renderer, interrupted=interrupted, reconnect=restarted)
    except KeyboardInterrupt:
        return 130
    final = be.connect().get(execution.id)  # the daemon may have restarted (with a new token) while we watched
    phase = phase or pb.Phase.Name(final.phase)
    if phase in EXIT_CODES:
        renderer.summary(final, phase, time.monotonic() - started)
    if args.keep_sandbox and renderer.sandbox_id:
        print(f"stigmer: sandbox {renderer.sandbox_id} kept running for inspection; delete it when you are done "
              "(Daytona also stops it once idle, then deletes it)", file=sys.stderr)
    return EXIT_CODES.get(phase, 130)


class ApprovalQuestions:
    """The foreground terminal's side of approvals: each approval request is asked about (the live view goes on);
    one thread reads the answers from stdin, each for the latest request still waiting. y approves, a approves
    always, n (or an empty line) denies, anything else denies with it as the reason. An answer given elsewhere
    first wins: its approval event withdraws the question here."""

    def __init__(self, be, renderer):
        import threading
        self.be, self.renderer = be, renderer
        self.lock, self.current, self.reader = threading.Lock(), None, None

    def request(self, ev):
        import threading
        with self.lock:
            self.current = ev
            if self.reader is None:
                self.reader = threading.Thread(target=self._read, name="approval-answers", daemon=True)
                self.reader.start()
        self.renderer.out("  approve? [y]es / [a]lways / [n]o / or type why not: ", err=True)
        sys.stderr.flush()

    def answered(self, ev):
        with self.lock:
            if self.current is not None and self.current.approval_request.id == ev.approval.id:
                self.current = None

    def _read(self):
        from contract import BackendError
        while True:
            try:
                line = sys.stdin.readline()
            except (OSError, ValueError):
                return
            if not line:
                return  # EOF: leave it to another terminal, or the timeout
            with self.lock:
                ev, self.current = self.current, None
            if ev is None:
                continue  # nothing waits (answered elsewhere): the line is not an answer
            text = line.strip()
            approved, always = text.lower() in ("y", "yes", "a", "always"), text.lower() in ("a", "always")
            reason = "" if approved or text.lower() in ("n", "no", "") else text
            try:
                client = self.be.connect()
                try:
                    client.approve(ev.execution_id, ev.approval_request.id, approved, reason, always, who())
                finally:
                    client.close()
            except BackendError as exc:
                self.renderer.out(f"stigmer: {exc}\n", err=True)


def confinement(cfg, sandbox_mode, network, parent=None):
    """(sandbox mode, network) of a run: the mode asked for (--sandbox-mode, STIGMER_SANDBOX_MODE), else PARENT's,
    else workspace-write; the network if asked for (--network, the agent's config.network) or PARENT had it.
    When commands run on this host confined and cannot be confined here: a CliError (exit 2) naming the fix."""
    from sandbox import CONFINED_MODES, confinement_problem
    sandbox_mode = sandbox_mode or (parent.spec.sandbox_mode if parent else "") or "workspace-write"
    network = network or bool(parent is not None and parent.spec.network)
    if cfg.sandbox == "filesystem" and sandbox_mode in CONFINED_MODES:
        problem = confinement_problem()
        if problem:
            raise CliError(f"{problem}; or run them unconfined with --sandbox-mode full-access "
                           "(or STIGMER_SANDBOX_MODE=full-access)", 2)
    return sandbox_mode, network


def redact_prompt(redactor, prompt):
    """PROMPT (the task and piped stdin) as it is submitted: with the secret values this CLI knows redacted,
    so that none is stored raw (the log, `list`, Redis); says so on stderr, naming how to pass one on."""
    redacted = redactor.redact(prompt)
    if redacted != prompt:
        import re
        found = sorted(set(re.findall(r"\[REDACTED:([A-Za-z0-9_]+)\]", redacted)) -
                       set(re.findall(r"\[REDACTED:([A-Za-z0-9_]+)\]", prompt)))
        print(f"stigmer: the prompt held the value of {', '.join(found)}: it is stored and sent as "
              f"[REDACTED:NAME]; to let the agent's shell use it, pass --secret {found[0]}", file=sys.stderr)
    return redacted


def plan_agent(cfg, args, workspace, resuming):
    """The pb.AgentSpec this run submits: --agent's (else STIGMER_AGENT's) agent, validated, its non-secret
    variables given their values (--env, the environment, the file's default, else asked for), or a bare one
    carrying --env's settings; None for the built-in agent. A resumed run keeps its parent's (None here).
    Every problem is a CliError (exit 2) before any prompt for a key."""
    import agents
    env_args = getattr(args, "env", None) or ()
    if resuming:
        if args.agent or env_args:
            raise CliError("a continued conversation keeps its agent and its settings: drop --agent and --env "
                           "(or start a new run)", 2)
        return None
    name = args.agent or cfg.agent
    if not name and not env_args:
        return None
    mod = project_secrets()
    try:
        overrides = agents.parse_env_args(env_args, mod.looks_secret)
        spec = agents.resolve(name, workspace, cfg.home) if name else None
        if spec is not None:
            agents.check_supported(spec)
        else:
            import stigmer_pb2 as pb
            spec = pb.AgentSpec()
        secret_names, unset = agents.fill_environment(spec, cfg.environ, overrides)
    except agents.AgentError as exc:
        raise CliError(str(exc), 2) from None
    missing = [n for n in secret_names if not cfg.environ.get(n)] + unset
    if missing and not mod.terminal_available():
        raise CliError(agents.missing_line(spec, sorted(missing)), 2)
    if unset:  # asked for now: their values are part of the spec
        try:
            answers = mod.gather((), unset, environ={}, labels=agents.env_labels(spec),
                                 warn=lambda m: print(f"stigmer: warning: {m}", file=sys.stderr))
        except mod.PromptCancelled:
            raise CliError("cancelled at the prompt", 130) from None
        except mod.SecretError as exc:
            raise CliError(str(exc), 2) from None
        for name_ in unset:
            spec.env_spec.data[name_].value = answers[name_]
    return spec


def agent_secrets(agent):
    """The names of the secrets AGENT (a pb.AgentSpec or None) declares."""
    return sorted(n for n, v in agent.env_spec.data.items() if v.is_secret) if agent is not None else []


def agent_labels(agent):
    """What the key prompt says for each variable AGENT declares."""
    import agents
    return agents.env_labels(agent) if agent is not None else {}


def project_docs(cfg, args, workspace, resuming):
    """The project's instruction files for the system prompt ([pb.ProjectDoc]), with a warning for each one
    the cap cut; none with --no-project-doc or when resuming (the conversation keeps its system prompt). In a
    Daytona sandbox the workspace is elsewhere: only the user's own $STIGMER_HOME/AGENTS.md is read."""
    if getattr(args, "no_project_doc", False) or resuming:
        return []
    import agents
    docs, warnings = agents.project_docs(workspace if cfg.sandbox == "filesystem" else None, cfg.home)
    for warning in warnings:
        print(f"stigmer: warning: {warning}", file=sys.stderr)
    return docs


def skill_refs(agent, workspace):
    """(slug, folder of the file that names it) of AGENT's skillRefs and its sub-agents' (and the agent files they
    refer to), in file order."""
    if agent is None:
        return []
    base = os.path.dirname(agent.source) if agent.source else workspace
    refs = [(r.slug, base) for r in agent.skill_refs]
    for sub in agent.sub_agents:
        refs += [(r.slug, base) for r in sub.skill_refs]
        refs += skill_refs(sub.agent_spec if sub.HasField("agent_spec") else None, workspace)
    return list(dict.fromkeys(refs))


def plan_approval(cfg, args, workspace, agent, resuming):
    """The pb.ApprovalPolicy this run submits (approvals.plan): --approval, else the agent's, else STIGMER_APPROVAL,
    else the settings files'; the rules of --allow/--deny and of both settings files; the wait for an answer
    (--approval-timeout; default 10 minutes in the foreground, none detached). None when resuming without any of
    the flags: the parent's holds."""
    policy = getattr(args, "approval", None) or (agent.approval if agent is not None else "") or \
        cfg.environ.get("STIGMER_APPROVAL", "")
    allow, deny = getattr(args, "allow", None) or [], getattr(args, "deny", None) or []
    timeout = getattr(args, "approval_timeout", None)
    if resuming and not (getattr(args, "approval", None) or allow or deny or timeout is not None):
        return None
    import agents
    import approvals
    if timeout is None:
        timeout = 0 if getattr(args, "detach", False) else approvals.FOREGROUND_TIMEOUT
    if timeout < 0:
        raise CliError(f"--approval-timeout must not be negative (got {timeout:g})", 2)
    try:
        return approvals.plan(policy, allow, deny, agents.project_dirs(workspace), cfg.home, timeout)
    except approvals.ApprovalError as exc:
        raise CliError(str(exc), 2) from None


def plan_mcp(cfg, args, agent, secret_names, resuming):
    """The MCP servers this run starts ([pb.McpServerDefinition], inline): --mcp-config's and AGENT's (mcp_tools.plan);
    none when resuming (the parent's, once it is known). Each ${NAME} they use must be a secret this run names or a
    variable it declares (the agent's envSpec, --env). A problem is a CliError (exit 2) before any prompt."""
    if resuming:
        return []
    config = getattr(args, "mcp_config", None)
    if not config and (agent is None or not agent.mcp_servers):
        return []
    import mcp_tools
    declared = set(secret_names) | (set(agent.env_spec.data) if agent is not None else set())
    try:
        return mcp_tools.plan(agent, os.path.abspath(os.path.expanduser(config)) if config else None, cfg.home,
                              declared)
    except mcp_tools.McpError as exc:
        raise CliError(str(exc), 2) from None


def plan_skills(cfg, args, workspace, agent, model, resuming):
    """The Agent Skills this run offers ([pb.Skill], sorted by name): those AGENT's skillRefs name, else all that
    were found (skills.py); none with --no-skills or when resuming (the parent's, once it is known). Prints a
    warning line for each skill skipped for a rule it breaks, and when the catalogue's budget cut it. For a Daytona
    sandbox the skills' files travel in the spec (its workspace is elsewhere: only the user's own skills count,
    and an agent's). A ref that does not resolve is a CliError (exit 2)."""
    if getattr(args, "no_skills", False) or resuming:
        return []
    import skills
    import stigmer_pb2 as pb
    local = cfg.sandbox == "filesystem"
    usable, skipped = skills.discover(workspace if local else None, cfg.home)
    refs = skill_refs(agent, workspace)
    try:
        chosen = skills.select(usable, skipped, refs) if refs else usable
    except skills.SkillError as exc:
        raise CliError(str(exc), 2) from None
    for s in skipped:
        if not refs:
            print(f"stigmer: warning: skill {s.path} is skipped: {s.problems[0]}", file=sys.stderr)
    # In a remote sandbox the catalogue shows where the worker puts them (worker.SKILLS_DIR): fit those paths.
    shown = chosen if local else [skills.Skill(s.name, s.description, REMOTE_SKILL.format(s.name)) for s in chosen]
    offered, warnings = skills.fit(shown, skills.budget(model, cfg.context_window))
    for warning in warnings:
        print(f"stigmer: warning: {warning}", file=sys.stderr)
    folders = {s.name: s.folder for s in chosen}
    result, total = [], 0
    for s in offered:
        skill = pb.Skill(name=s.name, description=s.description, path=os.path.join(folders[s.name], "SKILL.md"),
                         folder=folders[s.name])
        if not local:
            try:
                found = skills.files(skill.folder)
            except skills.SkillError as exc:
                raise CliError(str(exc), 2) from None
            total += sum(len(data) for _, data, _ in found)
            if total > skills.UPLOAD_MAX:
                raise CliError(f"the skills' files come to more than {skills.UPLOAD_MAX >> 20} MiB, too much to upload "
                               "into a sandbox: name fewer in the agent's skillRefs, or run with --no-skills", 2)
            skill.files.extend(pb.SkillFile(path=p, data=d, executable=x) for p, d, x in found)
        result.append(skill)
    return result


def find_parent(client, args, workspace):
    """The execution whose conversation this run continues: `resume ID`'s, or with -c the latest one whose
    workspace is WORKSPACE. Raises CliError when there is none or it has not ended."""
    from contract import parent_problem
    if args.command == "resume":
        parent = client.get(args.id)
    else:
        parent = next((ex for ex in client.list(limit=1000) if ex.spec.workspace == workspace), None)
        if parent is None:
            raise CliError(f"no execution ran in {workspace} yet, so there is nothing to continue: "
                           "run one with python runner.py \"your task\"", 2)
    problem = parent_problem(parent.id, parent)
    if problem:
        raise CliError(problem)
    return parent


def check_repo_args(cfg, args):
    """--repo, --ref and --keep-sandbox need a Daytona sandbox; a repo URL never carries a password."""
    from urllib.parse import urlsplit
    if (args.repo or args.ref or args.keep_sandbox) and cfg.sandbox != "daytona":
        raise CliError("--repo, --ref and --keep-sandbox need a Daytona sandbox: set STIGMER_SANDBOX=daytona "
                       "(on this host the agent works in --workspace, which may already be a git checkout)", 2)
    if args.ref and not args.repo:
        raise CliError("--ref needs --repo: the repository whose branch, tag or commit to check out", 2)
    if args.repo and urlsplit(args.repo).password:
        raise CliError("--repo must not hold a password or token (it is stored in the log): pass the token as "
                       "--secret GITHUB_TOKEN and give the plain https URL", 2)


def cmd_start(cfg, args, out=None, labels=None):
    cfg.require_sandbox()
    names = project_secrets().sandbox_secret_names(args.secret or (), cfg.environ)
    model = choose_model(cfg, args.model)
    secrets = gather_secrets(cfg, names, model, labels)
    logs = os.path.join(cfg.home, "logs")
    where = backend(cfg).start(out or sys.stdout)
    alive = sum(1 for p in pid_files(cfg) if os.path.basename(p).startswith("worker-") and live_pid(p))
    before = connected_runners(cfg)
    env = worker_env(cfg, secrets, cfg.endpoint)
    inherit = getattr(args, "inherit_env", False) or cfg.inherit_env
    allowed = names + [project_secrets().INHERIT_ALL] if inherit else names  # what its executions may pass to the shell
    started = []
    for n in range(1, 1000):
        if alive + len(started) >= args.workers:
            break
        path = os.path.join(logs, f"worker-{n}.pid")
        if live_pid(path):
            continue
        started.append((spawn(["worker", "--model", model, *allowed_args(names, inherit)], env,
                              os.path.join(logs, f"worker-{n}.log"), pid_path=path,
                              record=(model, ",".join(allowed) or "-")),  # what a foreground run checks before using it
                        os.path.join(logs, f"worker-{n}.log")))
    if started:
        wait_until_connected(cfg, started, before)
    started = len(started)
    print(f"{alive + started} worker(s) running{where} ({started} started); logs in {logs}", file=out)
    return 0


def connected_runners(cfg):
    """How many runners the backend has connected now (0 when it cannot say)."""
    from contract import BackendError
    client = connect(cfg)
    try:
        return client.status(timeout=2.0).connected_runners
    except BackendError:
        return 0
    finally:
        client.close()


def wait_until_connected(cfg, started, before, timeout=START_WAIT):
    """Wait until every worker in STARTED ((process, log path) pairs) that still runs has connected (BEFORE: the
    runners connected before they started) and there is a free shared slot, so that the next run finds a warm
    worker, in both modes; a CliError naming the log when every one has exited instead."""
    from contract import BackendError
    client = connect(cfg)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                st = client.status(timeout=2.0)
                running = sum(1 for proc, _ in started if proc.poll() is None)
                if st.free_capacity > 0 and st.connected_runners >= before + running:
                    return
            except BackendError:
                return  # the daemon went away: the next command says so
            if all(proc.poll() is not None for proc, _ in started):
                raise CliError(f"the worker exited at once: see {started[0][1]}")
            time.sleep(0.05)
    finally:
        client.close()


def cmd_stop(cfg, args):
    from terminal import plural
    from contract import BackendError
    try:
        found = backend(cfg).find()
        running = running_executions(found[0]) if found else []
    except (CliError, BackendError) as exc:  # a broken token or a sick daemon: stop is the fix, so go on
        print(f"stigmer: cannot list what is running ({exc}); stopping the processes", file=sys.stderr)
        found, running = None, []
    if running and not args.force:
        listing = "\n".join(f"  {line}" for line in describe(running))
        if not sys.stdin.isatty():
            raise CliError(f"{plural(len(running), 'execution')} running; `stop` would cancel them:\n{listing}\n"
                           "run `python runner.py stop --force` to cancel them and stop", 2)
        print(f"{plural(len(running), 'execution')} running; stopping cancels them:\n{listing}", file=sys.stderr)
        if not confirm("cancel them and stop? [y/N] "):
            raise CliError("nothing stopped", 1)
    for ex, line in zip(running, describe(running)):  # cancel first, so the log says who stopped them
        found[0].cancel(ex.id)
        print(f"cancelled {line}")
    if running:  # their runners record the end before the daemon goes
        wait_until_ended(found[0], running)
    files = pid_files(cfg)
    workers = [p for p in files if os.path.basename(p).startswith(("worker-", "warm-"))]  # warm: a run's, kept
    ordered = workers + [p for p in files if p not in workers]
    stopped = []
    for path in ordered:  # workers first, so they can report their last events to the daemon
        pid = live_pid(path)
        if pid:
            stop_pid(pid, lambda: live_pid(path, wait=0))
            stopped.append(os.path.basename(path)[:-4])
        with contextlib.suppress(FileNotFoundError):  # a warm worker takes its own away as it stops
            os.unlink(path)
    owner = daemon_owner(cfg)
    if owner and owner != os.getpid():  # a daemon with no pid file of ours: one a foreground run started
        stop_pid(owner, lambda: daemon_owner(cfg))
        stopped.append(f"the daemon a foreground run started (pid {owner})")
    if stopped:
        print(f"stopped {len(stopped)} process(es): {', '.join(stopped)}")
    else:
        print("nothing was running")
    return 0


def wait_until_ended(client, executions, timeout=10.0):
    """Wait up to TIMEOUT seconds for EXECUTIONS to reach a terminal phase, so that their runners
    (and any foreground run following them) see the end before the daemon stops."""
    from contract import TERMINAL_PHASES, BackendError
    deadline = time.monotonic() + timeout
    waiting = [ex.id for ex in executions]
    while waiting and time.monotonic() < deadline:
        try:
            waiting = [i for i in waiting if client.get(i).phase not in TERMINAL_PHASES]
        except BackendError:
            return
        if waiting:
            time.sleep(0.1)


def running_executions(client):
    """The executions the backend is running now."""
    import stigmer_pb2 as pb
    return list(client.list(pb.RUNNING, 1000))


def describe(executions):
    """`ex-… "first line of the prompt"` per execution."""
    return [f"{ex.id}  {json.dumps((ex.spec.prompt.splitlines() or [''])[0][:60], ensure_ascii=False)}"
            for ex in executions]


def confirm(question):
    """Ask QUESTION on the terminal; True for yes."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_status(cfg, args):
    be = backend(cfg)
    found = be.find()
    procs = be.processes()
    if found is None:
        raise CliError(f"no daemon answers at {cfg.endpoint}: start one with `python runner.py start`")
    import terminal
    client, status = found
    import home
    record = home.lock_record(os.path.join(cfg.home, "logs", "daemon.pid")) or []
    started_by_start = procs.get("daemon") == status.pid and record[1:2] != ["run"]  # a run's daemon idles out
    terminal.print_status(status, procs, client.endpoint, args.json, running=running_executions(client),
                          background=started_by_start, sandbox=sandbox_status(cfg))
    return 0


def sandbox_status(cfg):
    """For `status`: the sandbox mode a run gets here unless it asks, and why commands cannot be confined on
    this host (None when they can, or when they run elsewhere: Daytona)."""
    from sandbox import CONFINED_MODES, confinement_problem
    mode = cfg.sandbox_mode or "workspace-write"
    problem = confinement_problem() if cfg.sandbox == "filesystem" and mode in CONFINED_MODES else None
    return {"mode": mode, "sandbox": cfg.sandbox, "confinement": problem}


def cmd_list(cfg, args):
    import stigmer_pb2 as pb
    import terminal
    client, embedded = backend(cfg).open_log()
    try:
        terminal.print_executions(client.list(pb.Phase.Value(args.phase.upper()) if args.phase else 0, args.limit),
                                  args.json, phase=args.phase)
        return 0
    finally:
        if embedded:
            embedded.stop()


def cmd_logs(cfg, args):
    client, embedded = backend(cfg).open_log()
    try:
        import terminal
        execution = client.get(args.id)  # an unknown id becomes a one-line error
        if args.patch:
            return print_patch(client, execution)
        renderer = terminal.make_renderer(args.json, cfg.environ.get("NO_COLOR"))
        renderer.show_prompts = True
        renderer.full = args.full
        if args.history and execution.spec.parent_id:
            terminal.show_ancestors(client, execution, renderer)
        try:
            phase = terminal.follow(client, args.id, renderer, follow_live=args.follow and embedded is None,
                                    reconnect=lambda: connect(cfg))
        except KeyboardInterrupt:
            terminal.stopped_watching(renderer, args.id)
            return 130
        if phase not in EXIT_CODES:  # it has not ended (a replay without -f)
            renderer.newline()
            return 0
        final = (client if embedded else connect(cfg)).get(args.id)  # the daemon may have restarted (new token)
        if not renderer.json_lines:  # --json: the log's events only, as stored
            renderer.summary(final, phase, max(0.0, final.finished_at - (final.started_at or final.created_at)))
        return EXIT_CODES[phase]
    finally:
        if embedded:
            embedded.stop()


def print_patch(client, execution):
    """`logs ID --patch`: the patch artifact's text on stdout, as it is (for `git apply`); notes on stderr."""
    import stigmer_pb2 as pb
    patch = None
    for ev in client.watch(execution.id, follow=False):
        if ev.WhichOneof("payload") == "artifact" and ev.artifact.type == "patch":
            patch = ev.artifact
    if patch is None:
        if execution.phase in (pb.PENDING, pb.RUNNING):
            raise CliError(f"{execution.id} is still {pb.Phase.Name(execution.phase).lower()}: its patch is recorded "
                           f"when it ends (follow it with python runner.py logs {execution.id} -f)")
        raise CliError(f"{execution.id} has no patch: a run records one when its workspace is a git checkout and "
                       "it changed something there (not with --no-patch)")
    if patch.notes:
        print(f"stigmer: {patch.notes}", file=sys.stderr)
    sys.stdout.write(patch.text)
    return 0


def cmd_agents(cfg, args):
    """`agents`: the agent files a run here can use, in lookup order, with their problems; `agents show NAME`:
    one agent as a run would get it (secret values are never in a spec, so never shown)."""
    import agents
    workspace = getattr(args, "show_workspace", None) or args.workspace
    workspace = os.path.abspath(os.path.expanduser(workspace)) if workspace else cfg.sandbox_root
    as_json = args.json or getattr(args, "show_json", False)
    if args.agents_command == "show":
        return show_agent(cfg, args.name, workspace, as_json)
    found = agents.discover(workspace, cfg.home)
    if as_json:
        for item in found:
            print(json.dumps(item, ensure_ascii=False))
        return 0
    if not found:
        where = ", ".join(agents.display(d) for d in agents.search_dirs(workspace, cfg.home))
        print(f"no agents found in {where}: put NAME.yaml in one of them (an example: examples/agents/"
              "code-reviewer.yaml in the runner's source), or run one by path with --agent FILE")
        return 0
    width = max(len(item["name"]) for item in found)
    for item in found:
        description = item["description"].splitlines()[0][:60] if item["description"] else "-"
        print(f"{item['name']:<{width}}  {description:<60}  {agents.display(item['file'])}")
        if item["shadowed_by"]:
            print(f"{'':<{width}}  ! not used: {agents.display(item['shadowed_by'])} comes first in the lookup")
        for problem in item["problems"]:
            print(f"{'':<{width}}  ! {problem}")
    return 0


def show_agent(cfg, name, workspace, as_json):
    """`agents show NAME`: the resolved agent as YAML (or JSON), what its variables would be, what is unsupported."""
    import agents
    try:
        spec = agents.resolve(name, workspace, cfg.home)
    except agents.AgentError as exc:
        raise CliError(str(exc), 2) from None
    agents.fill_environment(spec, cfg.environ, {})  # non-secrets: the values a run here would get
    secrets = {n: "set" if cfg.environ.get(n) else "missing (asked for at the run)"
               for n, v in sorted(spec.env_spec.data.items()) if v.is_secret}
    unsupported = agents.unsupported(spec)
    if as_json:
        print(json.dumps({"file": spec.source, **agents.resource(spec), "secrets": secrets, "unsupported": unsupported},
                         ensure_ascii=False))
        return 0
    print(f"# {spec.name}: {agents.display(spec.source)}")
    for var, state in secrets.items():
        print(f"# secret {var}: {state}; its value is never shown or recorded")
    if unsupported:
        print(f"# not runnable yet: this version of the runner cannot honour {', '.join(unsupported)}")
    sys.stdout.write(agents.to_yaml(agents.resource(spec)))
    return 0


def cmd_skills(cfg, args):
    """`skills`: the Agent Skills a run here would offer, and those skipped with the rule they break."""
    import skills
    workspace = os.path.abspath(os.path.expanduser(args.workspace)) if args.workspace else cfg.sandbox_root
    return skills.command(workspace if cfg.sandbox == "filesystem" else None, cfg.home, args.json)


def cmd_recover(cfg, args):
    """`recover`: move a damaged database aside (kept, with a timestamp) and copy into a fresh one what SQLite can
    still read; says how many executions and events it kept. The daemon must be stopped first."""
    import sqlite3

    import store
    path = os.path.join(cfg.home, "stigmer.db")
    if daemon_owner(cfg) is not None:
        raise CliError("the daemon is running on this database: stop it first (`python runner.py stop`), "
                       "then run `python runner.py recover`")
    if not os.path.exists(path):
        raise CliError(f"there is no database at {path}: nothing to recover")
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):  # the write-ahead log holds the latest writes: it moves with the file
        if os.path.exists(path + suffix):
            os.rename(path + suffix, aside + suffix)
    try:
        db = store.open_db(path)
        try:
            executions, events = store.recover(aside, db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise CliError(f"could not copy from {aside} into a fresh {path}: {exc} (the damaged file is kept)") from None
    if args.json:
        print(json.dumps({"database": path, "damaged_copy": aside, "executions": executions, "events": events}))
    else:
        print(f"kept {executions} execution(s) and {events} event(s) in a fresh {path}; the damaged file is "
              f"{aside} (delete it once you are sure)")
    return 0


def cmd_cancel(cfg, args):
    import stigmer_pb2 as pb
    ex = connect(cfg).cancel(args.id)
    phase = pb.Phase.Name(ex.phase)
    print(f"{ex.id}: cancel requested; its runner is stopping it" if phase == "RUNNING" else f"{ex.id}: {phase}")
    return 0


def cmd_approve(cfg, args):
    """`approve ID [--always]`: approve the tool call of ID waiting for approval (the one waiting, or --request's)."""
    return answer(cfg, args.id, args.request, True, "", args.always)


def cmd_deny(cfg, args):
    """`deny ID [REASON]`: deny it; the model gets REASON."""
    return answer(cfg, args.id, args.request, False, " ".join(args.reason), False)


def answer(cfg, execution_id, request_id, approved, reason, always):
    """Send one answer to a waiting approval request; says which call it answered, or why none."""
    from contract import BackendError
    client = connect(cfg)
    try:
        answered = client.approve(execution_id, request_id, approved, reason, always, who())
    except BackendError as exc:
        raise CliError(str(exc), 1) from None
    finally:
        client.close()
    print(f"{execution_id}: call {answered} {'approved' if approved else 'denied'}"
          + (" (and calls like it, from now on)" if always else ""))
    return 0


def who():
    """Who answers, for the log: the user, their terminal, this process."""
    import getpass
    try:
        tty = os.ttyname(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        tty = "no terminal"
    return f"{getpass.getuser()} on {tty} (pid {os.getpid()})"


def cmd_daemon(cfg, args):
    import daemon_server
    return daemon_server.run(cfg.home, args.endpoint or cfg.endpoint, allow_remote=args.allow_remote,
                      runner_grace=cfg.runner_grace, idle_exit=args.idle_exit)


def worker_environ(args):
    """A worker's environment, its secrets included, which never stay in its environment block (readable by
    every process of the user at /proc/PID/environ, the agent's commands among them): a spawner hands them
    over in a pipe (processes.spawn); a worker started by hand with keys, credentials or secret-looking
    variables exported re-executes itself at once with them moved into one."""
    mod = project_secrets()
    try:
        moved = mod.inherited_secrets()
        extra = mod.sandbox_secret_names(args.secret or (), os.environ)
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None
    left = mod.environment_secrets(os.environ, extra)
    if left:
        mod.reexec_without_secrets(sorted(left), carried=moved)  # never returns
    return {**os.environ, **moved}


def cmd_worker(cfg, args):
    import logging

    cfg.require_sandbox()
    model = choose_model(cfg, args.model)
    environ = {**cfg.environ, **gather_secrets(cfg, [], model)}  # asks only for a missing key; held in memory
    mod = project_secrets()
    try:
        allowed = mod.sandbox_secret_names(args.secret or (), cfg.environ)
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None
    if args.inherit_env or cfg.inherit_env:
        allowed.append(mod.INHERIT_ALL)
    import worker
    from contract import VERSION
    be = backend(cfg)
    runner_id = args.runner_id or worker.new_runner_id()
    make_sandbox, sweep = worker.sandbox_factory(cfg, runner_id, backend_is_terminal(cfg))
    w = worker.Worker(capacity=args.capacity, mode=cfg.mode, model=model, runner_id=runner_id, pinned=args.pinned,
                      allowed_secrets=allowed, make_sandbox=make_sandbox, sweep=sweep, sandbox=cfg.sandbox,
                      environ=environ, context_window=cfg.context_window, also_secret=be.worker_secrets(),
                      log_dir=os.path.join(cfg.home, "logs"))
    w.start_preload(mcp=args.preload_mcp)  # the SDK's import is the slowest part of a cold start: begin it early
    level = {"development": logging.DEBUG, "staging": logging.INFO, "production": logging.WARNING}[cfg.env]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "openai", "grpc"):  # they log whole requests
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    import sandbox
    sandbox.guard_commands()  # should this worker be killed, even by SIGKILL, its commands die with it
    link = be.link()
    w.history = link.history
    where = f"sandbox root {cfg.sandbox_root}" if cfg.sandbox == "filesystem" else "sandbox daytona"
    print(f"stigmer worker {VERSION} · mode {cfg.mode} · endpoint {link.endpoint} · {where} · "
          f"model {model} · capacity {args.capacity}", file=sys.stderr, flush=True)
    mark = None
    if args.warm_for and args.pinned:  # a foreground run's: its pid file, should it stay warm
        mark = warm_marker(os.path.join(cfg.home, "logs", f"warm-{runner_id}.pid"),
                           (model, ",".join(allowed) or "-", runner_id), args.warm_print or "-")
    return worker.serve(w, link, exit_with_stdin=args.exit_with_stdin, warm_for=args.warm_for, mark=mark)
