"""Agents as Stigmer defines them: agent files, their lookup and validation, the AgentSpec they become,
the project's instruction files (AGENTS.md), and the variables an agent declares (envSpec).

    python runner.py agents                         # the agents this workspace can use, and their problems
    python runner.py agents show code-reviewer      # one, resolved (secret values are never shown)
    python runner.py --agent code-reviewer "review the last commit"
    python runner.py --agent ./my-agent.yaml "..."  # a file, by path

    spec = agents.resolve("code-reviewer", workspace, home)   # pb.AgentSpec; AgentError: one line to show
    docs, warnings = agents.project_docs(workspace, home)      # [pb.ProjectDoc], ["... cut ..."]

An agent file is YAML in the shape of Stigmer's Agent resource (read with PyYAML's safe_load: data,
never code):

    apiVersion: agentic.stigmer.ai/v1
    kind: Agent
    metadata: {name: code-reviewer, labels: {team: platform}}
    spec:
      description: Reviews the working tree's changes
      instructions: |
        You are a careful code reviewer ...
      envSpec:
        data:
          GITHUB_TOKEN: {isSecret: true, description: "a token that can read the repository"}
          REVIEW_STYLE: {value: concise, description: "concise or thorough"}
      config: {model: anthropic/claude-sonnet-4-5}

Field names are Stigmer's JSON names (camelCase); the proto's snake_case names are accepted too. Every
problem is an AgentError with one line naming the file, the line where YAML gives one, and the fix.

A name is looked up as .stigmer/agents/NAME.yaml (or .yml) in the workspace, then in each directory
above it up to the git root (nearest first), then as $STIGMER_HOME/agents/NAME.yaml.

What the other parts of the runner read from a pb.AgentSpec (see stigmer.proto):

- spec.mcp_servers: pb.McpServerDefinition, in file order, names unique. An inline definition has
  server.WhichOneof("server_type") in ("stdio", "http", "docker"); a bare name in the file (as Stigmer's
  own examples write them: `mcpServers: [github]`) becomes a definition with only `name` set
  (WhichOneof(...) is None): a server defined elsewhere. enabled_tools empty means all.
- spec.skill_refs: pb.SkillRef, in file order. `slug` is always set (a bare string in the file is the
  slug); `version` empty means the latest; scope, org and kind are carried as written (kind is "skill").
- spec.sub_agents: pb.SubAgent with a unique name, instructions (10 to 10,000 characters), mcp_servers
  (names of servers in spec.mcp_servers: checked here), mcp_tool_selections and skill_refs as above. Our
  addition: `agent: NAME` (or a bare NAME in the list, or a path relative to the file) makes the entry another
  agent file; resolve() reads it into sub.agent_spec and fills the entry's name, description and instructions
  from it where the entry leaves them out. The name general-purpose is the runner's own (subagents.py).
- spec.env_spec.data: NAME -> pb.EnvironmentValue. A secret (is_secret) never has a value in the spec;
  its value reaches the worker's environment like --secret's, and its name is in ExecutionSpec.secret_names.
  A non-secret's value is the one the run got (--env, else the environment, else the file's default).

Every field is honoured: the CLI resolves skillRefs to the skills the run offers (skills.select) and
mcpServers to the servers it starts (mcp_tools.plan). unsupported() and UNSUPPORTED stay for a field a
later Stigmer adds before this runner can use it.
"""
import os
import re

from google.protobuf.message import DecodeError

import stigmer_pb2 as pb

API_VERSION = "agentic.stigmer.ai/v1"  # apiVersion of an agent file
KIND = "Agent"  # kind of an agent file
AGENTS_DIR = os.path.join(".stigmer", "agents")  # where agent files live, under the workspace (or above) and STIGMER_HOME
EXTENSIONS = (".yaml", ".yml")  # an agent file's name is NAME plus one of these, looked up in this order
NAME_MAX = 63  # Stigmer's rule for agent names: lowercase letters, digits and hyphens, at most this long
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
INSTRUCTIONS_MIN, INSTRUCTIONS_MAX = 10, 10_000  # characters of spec.instructions (and a sub-agent's)
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # an envSpec variable's name
SERVER_NAME_RE = re.compile(r"[A-Za-z0-9_-]+\Z")  # an MCP server's name (it becomes part of tool names) ...
SERVER_NAME_MAX = 64  # ... at most this long
SUB_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # a sub-agent's name (the task tool's subagent_type)
FILE_MAX_BYTES = 1 << 20  # an agent file larger than this is refused
PROJECT_DOCS = ("AGENTS.md", "CLAUDE.md")  # per directory, the first that exists is read
PROJECT_DOC_CAP = 32 * 1024  # bytes of project instructions, in all, that go into the system prompt
PROJECT_DOC_MIN_CUT = 1024  # a file the cap cuts keeps at least this many bytes, else it is left out
UNSUPPORTED = ()  # fields parsed and carried but not honoured yet (see unsupported()): none now
GENERAL_PURPOSE = "general-purpose"  # the sub-agent every agent has (subagents.py): no file may declare it
SUB_AGENT_LEVELS = 2  # sub-agents of sub-agents: references are resolved this many levels down, no further
CACHE_DIR = os.path.join("cache", "agents")  # under STIGMER_HOME: agent files already parsed (see cached())
CACHE_VERSION = 3  # raise it when what load() makes of a file changes (2: sub-agents by reference; 3: approval)


class AgentError(Exception):
    """An agent cannot be used: one line a person can act on (the CLI exits 2 with it)."""


def unsupported(spec):
    """The fields of SPEC (a pb.AgentSpec) that this runner carries but cannot honour yet, in file order; its
    sub-agents' (and the agent files they refer to) count as its own."""
    present = {"mcpServers": len(spec.mcp_servers), "skillRefs": len(spec.skill_refs),
               "subAgents": len(spec.sub_agents)}
    for sub in spec.sub_agents:
        present["mcpServers"] += len(sub.mcp_servers)
        present["skillRefs"] += len(sub.skill_refs)
        for field in unsupported(sub.agent_spec):
            present[field] += 1
    return [field for field in UNSUPPORTED if present[field]]


def check_supported(spec):
    """Raise AgentError naming the fields of SPEC this runner cannot honour yet (before any prompt)."""
    fields = unsupported(spec)
    if fields:
        where = f" ({display(spec.source)})" if spec.source else ""
        listed = " and ".join([", ".join(fields[:-1]), fields[-1]] if len(fields) > 1 else fields)
        raise AgentError(f"agent {spec.name}{where} uses {listed}, which this version of the runner "
                         f"cannot honour yet: remove {'it' if len(fields) == 1 else 'them'} from the file to run it")


# ---- where agent files are ----

def git_root(path):
    """The nearest directory at or above PATH holding .git (a directory, or a worktree's file), or None."""
    path = os.path.abspath(path)
    while True:
        if os.path.exists(os.path.join(path, ".git")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def project_dirs(workspace):
    """WORKSPACE and each directory above it up to its git root, nearest first (WORKSPACE alone outside git)."""
    workspace = os.path.abspath(workspace)
    root = git_root(workspace)
    dirs = [workspace]
    while root and dirs[-1] != root:
        dirs.append(os.path.dirname(dirs[-1]))
    return dirs


def search_dirs(workspace, home):
    """The directories a name is looked up in, in order: .stigmer/agents from WORKSPACE up to its git root,
    then HOME/agents (HOME: STIGMER_HOME)."""
    return [os.path.join(d, AGENTS_DIR) for d in project_dirs(workspace)] + [os.path.join(home, "agents")]


def is_path(name_or_path):
    """True when --agent's value names a file rather than an agent: it has a slash or a YAML extension."""
    return os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith(EXTENSIONS)


def find(name_or_path, workspace, home):
    """The agent file NAME_OR_PATH means (a path as given, relative to the current directory; or a name
    looked up in search_dirs). Raises AgentError saying where it looked."""
    if is_path(name_or_path):
        path = os.path.abspath(os.path.expanduser(name_or_path))
        if not os.path.isfile(path):
            raise AgentError(f"agent file {name_or_path} does not exist (or is not a file): give the path of a "
                             f"YAML agent file, or an agent's name (see python runner.py agents)")
        return path
    if not NAME_RE.match(name_or_path) or len(name_or_path) > NAME_MAX:
        raise AgentError(f"{name_or_path!r} is not an agent name ({name_rule()}) nor a path to a .yaml file: "
                         "see python runner.py agents")
    dirs = search_dirs(workspace, home)
    for folder in dirs:
        for ext in EXTENSIONS:
            path = os.path.join(folder, name_or_path + ext)
            if os.path.isfile(path):
                return path
    where = ", ".join(display(d) for d in dirs)
    known = sorted({os.path.splitext(n)[0] for d in dirs if os.path.isdir(d) for n in os.listdir(d)
                    if n.endswith(EXTENSIONS)})
    import difflib
    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise AgentError(f"no agent named {name_or_path}: {hint}looked for {name_or_path}.yaml in {where}; "
                     f"create one there, or give a file's path (see python runner.py agents)")


def resolve(name_or_path, workspace, home):
    """The pb.AgentSpec of NAME_OR_PATH (see find), validated; raises AgentError. A file parsed before and
    unchanged since comes from HOME's cache (see cached)."""
    path = find(name_or_path, workspace, home)
    spec = cached(path, os.path.join(home, CACHE_DIR))
    if not is_path(name_or_path):
        check_file_name(spec, path)
    resolve_sub_agents(spec, workspace, home)
    return spec


def resolve_sub_agents(spec, workspace, home, chain=(), level=1, top=None):
    """Read the agent files SPEC's sub-agents refer to (sub.agent) into sub.agent_spec, in place, and theirs down
    to SUB_AGENT_LEVELS; fill each entry's name, description and instructions from its file where the entry left
    them out. A name is looked up as --agent looks one up, a path is relative to SPEC's file. The variables a
    referenced file declares become the running agent's (TOP's) too, since sub-agents share its shell: gathered
    at submit like its own (a secret stays a secret). Raises AgentError for a file that is missing or invalid,
    or a loop."""
    top = spec if top is None else top
    chain = (*chain, spec.source)
    for sub in spec.sub_agents:
        if not sub.agent:
            continue
        ref = sub.agent
        if is_path(ref) and not os.path.isabs(os.path.expanduser(ref)) and spec.source:
            ref = os.path.join(os.path.dirname(spec.source), ref)
        try:
            path = find(ref, workspace, home)
            if path in chain:
                raise AgentError(f"{display(path)} refers to itself through its sub-agents "
                                 f"({' -> '.join(display(p) for p in (*chain, path) if p)}): break the loop")
            target = cached(path, os.path.join(home, CACHE_DIR))
            if not is_path(ref):
                check_file_name(target, path)
        except AgentError as exc:
            where = f"{display(spec.source)}: " if spec.source else ""
            raise AgentError(f"{where}sub-agent {sub.name}: {exc}") from None
        for name, value in target.env_spec.data.items():
            mine = top.env_spec.data
            if name not in mine:
                mine[name].CopyFrom(value)
            elif value.is_secret and not mine[name].is_secret:
                mine[name].CopyFrom(pb.EnvironmentValue(is_secret=True, description=mine[name].description))
        if level < SUB_AGENT_LEVELS:
            resolve_sub_agents(target, workspace, home, chain, level + 1, top)
        else:
            del target.sub_agents[:]  # a sub-agent this deep starts none of its own
        sub.agent_spec.CopyFrom(target)
        sub.description = sub.description or target.description
        sub.instructions = sub.instructions or target.instructions
        if not sub.skill_refs:
            sub.skill_refs.extend(target.skill_refs)


def check_file_name(spec, path):
    """An agent found by name must be called what its file is called (else `agents` would list one name
    and --agent need another)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if spec.name != stem:
        raise AgentError(f"{display(path)}: metadata.name is {spec.name} but the file is named {stem}: "
                         f"rename the file to {spec.name}{os.path.splitext(path)[1]} or set metadata.name: {stem}")


def discover(workspace, home):
    """Every agent file in search_dirs, in lookup order, as dicts for `agents`: name (the file's), description,
    file, problems (one line each: what stops it from running here), shadowed_by (the file a lookup finds
    first, for a name found twice)."""
    found, first = [], {}
    for folder in search_dirs(workspace, home):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for entry in names:
            stem, ext = os.path.splitext(entry)
            path = os.path.join(folder, entry)
            if ext not in EXTENSIONS or not os.path.isfile(path):
                continue
            item = {"name": stem, "description": "", "file": path, "problems": [], "shadowed_by": None}
            try:
                spec = load(path)
                check_file_name(spec, path)
                item["description"] = spec.description
                resolve_sub_agents(spec, workspace, home)
                check_supported(spec)
                import mcp_tools
                mcp_tools.plan(spec, None, home, declared=None)  # its servers: each defined, none a docker one
            except AgentError as exc:
                item["problems"].append(str(exc))
            except mcp_tools.McpError as exc:
                item["problems"].append(f"agent {spec.name}: {exc}")
            if stem in first:
                item["shadowed_by"] = first[stem]
            else:
                first[stem] = path
            found.append(item)
    return found


def display(path):
    """PATH relative to the current directory when it is under it, else as it is."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def name_rule():
    return (f"lowercase letters, digits and hyphens, starting and ending with a letter or digit, at most "
            f"{NAME_MAX} characters, e.g. code-reviewer")


# ---- reading and checking an agent file ----

def cached(path, cache_dir):
    """load(PATH), kept in CACHE_DIR as the serialized spec: a file unchanged since (same inode, size, mtime
    and ctime, and the same CACHE_VERSION) is not parsed again, so a run with an agent needs no `import yaml`
    (tens of ms of a cold start). Only specs that passed every check are kept; they hold no secret value."""
    import hashlib
    try:
        st = os.stat(path)
    except OSError as exc:
        raise AgentError(f"cannot read agent file {display(path)}: {exc.strerror or exc}") from None
    stamp = f"{CACHE_VERSION} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {path}\n".encode()
    entry = os.path.join(cache_dir, hashlib.sha256(path.encode()).hexdigest()[:32] + ".pb")
    try:
        with open(entry, "rb") as f:
            data = f.read()
        if data.startswith(stamp):
            return pb.AgentSpec.FromString(data[len(stamp):])
    except OSError:  # no entry yet: parse
        pass
    except DecodeError:  # a damaged entry: parse, and replace it
        pass
    spec = load(path)
    try:
        import home
        home.private_dirs(cache_dir)
        partial = f"{entry}.{os.getpid()}"
        fd = home.private_open(partial, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.write(stamp + spec.SerializeToString())
        os.replace(partial, entry)
    except OSError:  # a read-only or full STIGMER_HOME: the next run parses the file again, nothing worse
        pass
    return spec


class Problem(Exception):
    """A problem at a place in the file: PATH is the keys and indexes leading to it, as written."""

    def __init__(self, path, message):
        super().__init__(message)
        self.path, self.message = list(path), message


def load(path):
    """Read, parse (yaml.safe_load) and check the agent file at PATH; returns its pb.AgentSpec."""
    import yaml
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise AgentError(f"cannot read agent file {display(path)}: {exc.strerror or exc}") from None
    if len(raw) > FILE_MAX_BYTES:
        raise AgentError(f"{display(path)}: an agent file is at most {FILE_MAX_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AgentError(f"{display(path)}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise AgentError(f"{display(path)}{where}: not valid YAML: {what}{column}; fix the syntax there") from None
    try:
        spec = agent_spec(data)
    except Problem as problem:
        line = line_of(text, problem.path)
        raise AgentError(f"{display(path)}{f':{line}' if line else ''}: {problem.message}") from None
    spec.source = path
    return spec


def line_of(text, path):
    """The 1-based line of the YAML node at PATH (keys and indexes as written), or of the nearest node
    above it that exists; 0 when YAML cannot say."""
    import yaml
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return 0
    line = node.start_mark.line + 1 if node is not None else 0
    for step in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(step)), None)
            if pair is None:
                break
            line = pair[0].start_mark.line + 1
            node = pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return line


def where(path):
    """`spec.mcpServers[0].stdio` for the path ["spec", "mcpServers", 0, "stdio"]."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out or "the file"


def camel(key):
    """A proto field name in Stigmer's JSON spelling: mcp_servers -> mcpServers."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key)


TYPE_NAMES = {str: "text", bool: "true or false", int: "a whole number", list: "a list", dict: "a mapping"}


def kind_of(value):
    return {type(None): "empty", bool: "true/false", int: "a number", float: "a number", str: "text",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def fields(value, path, known, required=()):
    """VALUE as a mapping of KNOWN field names (camelCase; snake_case accepted) to (value, path of it);
    an unknown or duplicate field, or a missing REQUIRED one, is a Problem. Empty values count as absent."""
    if not isinstance(value, dict):
        raise Problem(path, f"{where(path)} must be a mapping (field: value lines), not {kind_of(value)}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise Problem(path, f"{where(path)}: field names are text, not {kind_of(key)} ({key!r})")
        name = camel(key)
        if name not in known:
            import difflib
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the fields are {', '.join(known)}"
            raise Problem(path + [key], f"{where(path + [key])}: unknown field: {hint}")
        if name in out:
            raise Problem(path + [key], f"{where(path + [key])}: {name} is given twice; keep one")
        if item is not None:
            out[name] = (item, path + [key])
    missing = [name for name in required if name not in out]
    if missing:
        raise Problem(path, f"{where(path)}: missing {', '.join(missing)}")
    return out


def typed(entry, want, default=None):
    """The value of ENTRY ((value, path) or None) checked to be of type WANT; DEFAULT when absent."""
    if entry is None:
        return default
    value, path = entry
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        hint = " (quote it to make it text)" if want is str and isinstance(value, (int, float, bool)) else ""
        raise Problem(path, f"{where(path)} must be {TYPE_NAMES[want]}, not {kind_of(value)}{hint}")
    return value


def texts(entry):
    """A list of text (ENTRY as in typed); [] when absent."""
    items = typed(entry, list, [])
    for n, item in enumerate(items):
        typed((item, entry[1] + [n]), str)
    return items


def text_map(entry):
    """A mapping of text to text (labels, headers, env placeholders); {} when absent."""
    value = typed(entry, dict, {})
    for key, item in value.items():
        if not isinstance(key, str):
            raise Problem(entry[1], f"{where(entry[1])}: keys are text, not {kind_of(key)} ({key!r})")
        typed((item, entry[1] + [key]), str)
    return value


def number(entry, path_hint, low, high, whole=False):
    """A number (or text holding one, as Stigmer's examples quote them) between LOW and HIGH; None when absent."""
    if entry is None:
        return None
    value, path = entry
    try:
        if isinstance(value, bool):
            raise ValueError
        parsed = int(value) if whole else float(value)
    except (TypeError, ValueError):
        raise Problem(path, f"{where(path)} must be {'a whole number' if whole else 'a number'}, e.g. {path_hint}") \
            from None
    if not low <= parsed <= high:
        raise Problem(path, f"{where(path)} must be between {low} and {high} (got {value})")
    return parsed


def instructions_of(entry, path):
    """Instructions: text of INSTRUCTIONS_MIN to INSTRUCTIONS_MAX characters (surrounding blank space aside)."""
    text = typed(entry, str, "").strip()
    at = entry[1] if entry else path
    if len(text) < INSTRUCTIONS_MIN:
        raise Problem(at, f"{where(path)}.instructions must be at least {INSTRUCTIONS_MIN} characters "
                          f"(got {len(text)}): say who the agent is and how it works")
    if len(text) > INSTRUCTIONS_MAX:
        raise Problem(at, f"{where(path)}.instructions must be at most {INSTRUCTIONS_MAX:,} characters (got "
                          f"{len(text):,}): move reference material into the project's AGENTS.md or a skill")
    return text


def agent_spec(data):
    """The pb.AgentSpec of a parsed agent file (DATA: what safe_load returned); raises Problem."""
    if data is None:
        raise Problem([], f"the file is empty: an agent file starts with apiVersion: {API_VERSION} and kind: {KIND}")
    top = fields(data, [], ("apiVersion", "kind", "metadata", "spec"), required=("apiVersion", "kind", "metadata", "spec"))
    if typed(top["apiVersion"], str) != API_VERSION:
        raise Problem(top["apiVersion"][1], f"apiVersion must be {API_VERSION} (got {top['apiVersion'][0]})")
    if typed(top["kind"], str) != KIND:
        raise Problem(top["kind"][1], f"kind must be {KIND} (got {top['kind'][0]}): this runner runs agents")
    meta = fields(top["metadata"][0], top["metadata"][1],
                  ("name", "slug", "id", "org", "ownerScope", "labels", "annotations", "tags", "version"),
                  required=("name",))
    name = typed(meta["name"], str)
    if not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise Problem(meta["name"][1], f"metadata.name {name!r} breaks Stigmer's rule for names: {name_rule()}")
    for key in ("slug", "id", "org", "ownerScope"):
        typed(meta.get(key), str)
    text_map(meta.get("annotations"))
    texts(meta.get("tags"))
    if "version" in meta:
        version = fields(*meta["version"], ("id", "message", "previousVersionId"))
        for entry in version.values():
            typed(entry, str)
    body = fields(top["spec"][0], top["spec"][1], ("description", "iconUrl", "instructions", "mcpServers",
                                                   "skillRefs", "subAgents", "envSpec", "config", "approval"),
                  required=("instructions",))
    spec = pb.AgentSpec(name=name, labels=text_map(meta.get("labels")),
                        description=typed(body.get("description"), str, "").strip(),
                        icon_url=typed(body.get("iconUrl"), str, ""),
                        instructions=instructions_of(body["instructions"], ["spec"]))
    if "approval" in body:
        spec.approval = typed(body["approval"], str)
        if spec.approval not in ("never", "on-write", "always"):
            raise Problem(body["approval"][1], f"{where(body['approval'][1])} must be never, on-write or always "
                                               f"(got {spec.approval!r})")
    servers = typed(body.get("mcpServers"), list, [])
    for n, item in enumerate(servers):
        server = mcp_server(item, body["mcpServers"][1] + [n])
        if any(s.name == server.name for s in spec.mcp_servers):
            raise Problem(body["mcpServers"][1] + [n], f"spec.mcpServers[{n}]: the name {server.name} is used twice")
        spec.mcp_servers.append(server)
    spec.skill_refs.extend(skill_refs(body.get("skillRefs")))
    for n, item in enumerate(typed(body.get("subAgents"), list, [])):
        sub = sub_agent(item, body["subAgents"][1] + [n], {s.name for s in spec.mcp_servers})
        if any(s.name == sub.name for s in spec.sub_agents):
            raise Problem(body["subAgents"][1] + [n], f"spec.subAgents[{n}]: the name {sub.name} is used twice")
        spec.sub_agents.append(sub)
    if "envSpec" in body:
        spec.env_spec.CopyFrom(env_spec(*body["envSpec"]))
    if "config" in body:
        spec.config.CopyFrom(agent_config(*body["config"]))
    return spec


def mcp_server(item, path):
    """A pb.McpServerDefinition from a bare name or an inline definition."""
    if isinstance(item, str):
        name = item
    else:
        f = fields(item, path, ("name", "stdio", "http", "docker", "enabledTools"), required=("name",))
        name = typed(f["name"], str)
    if not SERVER_NAME_RE.match(name) or len(name) > SERVER_NAME_MAX:
        raise Problem(path, f"{where(path)}: the server name {name!r} must be 1 to 64 letters, digits, - or _ "
                            "(it becomes part of the tools' names)")
    server = pb.McpServerDefinition(name=name)
    if isinstance(item, str):
        return server
    kinds = [k for k in ("stdio", "http", "docker") if k in f]
    if len(kinds) > 1:
        raise Problem(path, f"{where(path)}: give one of stdio, http and docker, not {' and '.join(kinds)}")
    server.enabled_tools.extend(texts(f.get("enabledTools")))
    if "stdio" in f:
        s = fields(*f["stdio"], ("command", "args", "envPlaceholders", "workingDir"), required=("command",))
        server.stdio.CopyFrom(pb.StdioServer(command=typed(s["command"], str), args=texts(s.get("args")),
                                             env_placeholders=text_map(s.get("envPlaceholders")),
                                             working_dir=typed(s.get("workingDir"), str, "")))
    elif "http" in f:
        h = fields(*f["http"], ("url", "headers", "queryParams", "timeoutSeconds"), required=("url",))
        url = typed(h["url"], str)
        if not url.startswith(("http://", "https://")):
            raise Problem(h["url"][1], f"{where(h['url'][1])} must start with http:// or https:// (got {url!r})")
        server.http.CopyFrom(pb.HttpServer(url=url, headers=text_map(h.get("headers")),
                                           query_params=text_map(h.get("queryParams")),
                                           timeout_seconds=number(h.get("timeoutSeconds"), "30", 0, 3600, True) or 0))
    elif "docker" in f:
        d = fields(*f["docker"], ("image", "args", "envPlaceholders", "volumes", "network", "ports", "containerName"),
                   required=("image",))
        docker = pb.DockerServer(image=typed(d["image"], str), args=texts(d.get("args")),
                                 env_placeholders=text_map(d.get("envPlaceholders")),
                                 network=typed(d.get("network"), str, ""),
                                 container_name=typed(d.get("containerName"), str, ""))
        for n, v in enumerate(typed(d.get("volumes"), list, [])):
            vf = fields(v, d["volumes"][1] + [n], ("hostPath", "containerPath", "readOnly"),
                        required=("hostPath", "containerPath"))
            docker.volumes.add(host_path=typed(vf["hostPath"], str), container_path=typed(vf["containerPath"], str),
                               read_only=typed(vf.get("readOnly"), bool, False))
        for n, p in enumerate(typed(d.get("ports"), list, [])):
            pf = fields(p, d["ports"][1] + [n], ("hostPort", "containerPort", "protocol"),
                        required=("hostPort", "containerPort"))
            protocol = typed(pf.get("protocol"), str, "")
            if protocol not in ("", "tcp", "udp"):
                raise Problem(pf["protocol"][1], f"{where(pf['protocol'][1])} must be tcp or udp")
            docker.ports.add(host_port=number(pf["hostPort"], "8080", 1, 65535, True),
                             container_port=number(pf["containerPort"], "8080", 1, 65535, True), protocol=protocol)
        server.docker.CopyFrom(docker)
    return server


def skill_refs(entry):
    """pb.SkillRef from a list of slugs or references ({slug, version, scope, org, kind})."""
    refs = []
    for n, item in enumerate(typed(entry, list, [])):
        path = entry[1] + [n]
        if isinstance(item, str):
            slug, version, scope, org, kind = item, "", "", "", ""
        else:
            f = fields(item, path, ("slug", "version", "scope", "org", "kind"), required=("slug",))
            slug, version, scope, org, kind = (typed(f.get(k), str, "") for k in ("slug", "version", "scope", "org",
                                                                                 "kind"))
            if kind and kind.lower() != "skill":
                raise Problem(f["kind"][1], f"{where(f['kind'][1])} must be skill (got {kind})")
        if not slug.strip():
            raise Problem(path, f"{where(path)}: a skill reference needs a slug, e.g. code-review")
        refs.append(pb.SkillRef(slug=slug.strip(), version=version, scope=scope, org=org, kind=kind and "skill"))
    return refs


def sub_agent(item, path, servers):
    """A pb.SubAgent, inline or (`agent:`, or a bare name) a reference to another agent file that resolve()
    reads; its mcpServers must be names in SERVERS (the parent's)."""
    if isinstance(item, str):
        item = {"agent": item}
    known = ("name", "description", "instructions", "mcpServers", "mcpToolSelections", "skillRefs", "agent")
    f = fields(item, path, known)
    ref = typed(f.get("agent"), str, "").strip()
    if "agent" in f and not ref:
        raise Problem(f["agent"][1], f"{where(f['agent'][1])} must name an agent file, e.g. code-reviewer")
    for needed in ("name", "instructions"):
        if needed not in f and not ref:
            raise Problem(path, f"{where(path)}: missing {needed} (or give agent: NAME to use another agent file)")
    default_name = os.path.splitext(os.path.basename(ref))[0] if ref else ""
    name = typed(f.get("name"), str, default_name).strip()
    at = f["name"][1] if "name" in f else path
    if not SUB_NAME_RE.match(name):
        raise Problem(at, f"{where(at)}: the sub-agent name {name!r} must be 1 to 64 letters, digits, - or _ "
                          "(the parent names it in the task tool)")
    if name == GENERAL_PURPOSE:
        raise Problem(at, f"{where(at)}: {GENERAL_PURPOSE} is the sub-agent every agent already has: give yours "
                          "another name")
    instructions = instructions_of(f["instructions"], path) if "instructions" in f else ""
    sub = pb.SubAgent(name=name, description=typed(f.get("description"), str, "").strip(),
                      instructions=instructions, agent=ref)
    for n, server in enumerate(texts(f.get("mcpServers"))):
        if server not in servers:
            at = f["mcpServers"][1] + [n]
            raise Problem(at, f"{where(at)}: {server} is not one of spec.mcpServers; add it there first")
        sub.mcp_servers.append(server)
    selections = typed(f.get("mcpToolSelections"), dict, {})
    for server, selection in selections.items():
        at = f["mcpToolSelections"][1] + [server]
        if server not in sub.mcp_servers:
            raise Problem(at, f"{where(at)}: {server} is not in this sub-agent's mcpServers")
        tools = fields(selection, at, ("enabledTools",))
        sub.mcp_tool_selections[server].enabled_tools.extend(texts(tools.get("enabledTools")))
    sub.skill_refs.extend(skill_refs(f.get("skillRefs")))
    return sub


def env_spec(value, path):
    """A pb.EnvironmentSpec. A secret may not carry a value in the file: files get committed and shared."""
    f = fields(value, path, ("description", "data"))
    env = pb.EnvironmentSpec(description=typed(f.get("description"), str, "").strip())
    for name, item in typed(f.get("data"), dict, {}).items():
        at = f["data"][1] + [name]
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            raise Problem(at, f"{where(at)}: {name!r} is not an environment variable name (letters, digits and _, "
                              "not starting with a digit)")
        v = fields(item if item is not None else {}, at, ("value", "isSecret", "description"))
        secret = typed(v.get("isSecret"), bool, False)
        default = typed(v.get("value"), str, "")
        if secret and default:
            raise Problem(v["value"][1], f"{where(at)}: a secret's value does not belong in an agent file (files are "
                                         f"committed and shared): remove value, and export {name} or type it at the "
                                         "prompt")
        env.data[name].CopyFrom(pb.EnvironmentValue(value=default, is_secret=secret,
                                                    description=typed(v.get("description"), str, "").strip()))
    return env


def agent_config(value, path):
    """A pb.AgentConfig from spec.config (model, temperature, maxTokens, network)."""
    f = fields(value, path, ("model", "temperature", "maxTokens", "network"))
    config = pb.AgentConfig(model=typed(f.get("model"), str, "").strip(), network=typed(f.get("network"), bool, False))
    temperature = number(f.get("temperature"), "0.7", 0, 2)
    if temperature is not None:
        config.temperature = temperature
    config.max_tokens = number(f.get("maxTokens"), "4096", 1, 1_000_000, True) or 0
    return config


# ---- the project's instructions ----

def project_docs(workspace, home, cap=PROJECT_DOC_CAP):
    """The instruction files for WORKSPACE (None: the user's own only), in system-prompt order, and one
    warning per file the cap cut: ([pb.ProjectDoc], [str]). HOME/AGENTS.md (the user's own) first, then per directory from the git root
    down to WORKSPACE its AGENTS.md (else its CLAUDE.md): the nearest, most specific, comes last. When they
    hold more than CAP bytes in all, the nearest keep theirs first: the ones further up are cut to what is
    left (at a line end) or left out, each named in a warning."""
    found = []
    for folder in reversed(project_dirs(workspace)) if workspace else ():
        for name in PROJECT_DOCS:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found.append(path)
                break
    user = os.path.join(home, "AGENTS.md")
    if os.path.isfile(user) and user not in found:
        found.insert(0, user)
    texts_by_path = {}
    for path in found:
        try:
            with open(path, "rb") as f:
                texts_by_path[path] = f.read()
        except OSError:
            continue  # unreadable: as if absent
    docs, warnings, left = {}, [], cap
    for path in reversed(list(texts_by_path)):  # nearest first
        raw = texts_by_path[path]
        body = raw.strip()
        if not body:
            continue
        if len(body) <= left:
            docs[path] = pb.ProjectDoc(path=path, text=body.decode("utf-8", "replace"), size=len(raw))
            left -= len(body)
            continue
        cut = body[:left]
        cut = cut[:cut.rfind(b"\n")] if b"\n" in cut else b""
        if len(cut.strip()) >= PROJECT_DOC_MIN_CUT:
            docs[path] = pb.ProjectDoc(path=path, text=cut.decode("utf-8", "ignore").rstrip(), size=len(raw),
                                       truncated=True)
            warnings.append(f"{display(path)} was cut to its first {len(cut):,} of {len(raw):,} bytes: project "
                            f"instructions are capped at {cap // 1024} KiB in all (--no-project-doc skips them)")
        else:
            warnings.append(f"{display(path)} ({len(raw):,} bytes) was left out: project instructions are capped at "
                            f"{cap // 1024} KiB in all, and files nearer the workspace come first")
            cut = b""
        left -= len(cut)
    return [docs[p] for p in texts_by_path if p in docs], warnings


# ---- the variables an agent declares ----

def parse_env_args(pairs, looks_secret):
    """--env NAME=VALUE pairs as {NAME: VALUE}; raises AgentError on a bad one, or on a NAME that
    LOOKS_SECRET(name) says holds a secret (--env values are recorded in the log)."""
    values = {}
    for pair in pairs or ():
        name, eq, value = pair.partition("=")
        if not eq or not ENV_NAME_RE.match(name):
            raise AgentError(f"--env {pair!r} is not NAME=VALUE with a variable name (letters, digits and _, "
                             "not starting with a digit), e.g. --env REVIEW_STYLE=thorough")
        if looks_secret(name):
            raise AgentError(f"--env {name}=... looks like a secret, and --env values are recorded in the log: "
                             f"export {name} and pass --secret {name} (or declare it isSecret in the agent's envSpec)")
        values[name] = value
    return values


def fill_environment(spec, environ, overrides):
    """Give SPEC's non-secret variables the values this run gets, in place: --env's (OVERRIDES), else the
    environment's (ENVIRON), else the file's default; an OVERRIDES name the agent does not declare is added
    as a non-secret of its own. Returns (secret names, names of non-secrets still without a value), sorted.
    Raises AgentError when --env names a declared secret."""
    data = spec.env_spec.data
    for name, value in overrides.items():
        if name in data and data[name].is_secret:
            raise AgentError(f"--env {name}=... sets a secret the agent declares, and --env values are recorded in "
                             f"the log: export {name} instead, or type it at the prompt")
    for name, value in overrides.items():
        if name not in data:
            data[name].description = "set with --env"
    secrets, unset = [], []
    for name in sorted(data):
        v = data[name]
        if v.is_secret:
            secrets.append(name)
        elif name in overrides:
            v.value = overrides[name]
        elif environ.get(name):
            v.value = environ[name]
        elif not v.value:
            unset.append(name)
    return secrets, unset


def env_labels(spec):
    """What the prompt says for each variable SPEC declares: its description, else whose it is."""
    who = f"the agent {spec.name}" if spec.name else "this run"
    return {name: v.description or f"{'Secret' if v.is_secret else 'Setting'} of {who}"
            for name, v in spec.env_spec.data.items()}


def missing_line(spec, names):
    """The one line for variables NAMES that are not set when there is no terminal to ask on."""
    data = spec.env_spec.data
    each = "; ".join(f"{n} ({data[n].description})" if data[n].description else n for n in names)
    exports = " ".join(f"{n}=..." for n in names if data[n].is_secret)
    settings = " ".join(f"--env {n}=..." for n in names if not data[n].is_secret)
    how = " and ".join(part for part in (f"export {exports}" if exports else "",
                                         f"give {settings}" if settings else "") if part)
    who = f"the agent {spec.name}" if spec.name else "this run"
    return (f"{who} needs {each}, {'which are' if len(names) > 1 else 'which is'} not set, and there is no terminal "
            f"to ask on: {how}")


# ---- showing an agent ----

def resource(spec):
    """SPEC as the agent resource it came from (apiVersion, kind, metadata, spec: Stigmer's JSON names), a
    dict ready for YAML or JSON. Secret values are never in a spec, so never here."""
    from google.protobuf.json_format import MessageToDict
    body = MessageToDict(spec)
    meta = {"name": body.pop("name", "")}
    if spec.labels:
        meta["labels"] = body.pop("labels")
    body.pop("source", None)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": body}


def to_yaml(data):
    """DATA as block YAML, multi-line text as literal blocks (|), keys in the order given."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
