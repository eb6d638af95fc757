"""Agent Skills: find SKILL.md folders, check them against the Agent Skills standard, choose the ones a run
offers, fit their catalogue to its budget, and let the agent read them.

    usable, skipped = skills.discover(workspace, home)          # [Skill], [Skill with .problems]
    chosen = skills.select(usable, skipped, refs, base)         # an agent's skillRefs; SkillError: one line
    offered, warnings = skills.fit(chosen, skills.budget(model, override))
    text = skills.catalogue(offered)                             # the system prompt's section ("" for none)
    shelf = skills.Shelf(spec_skills, box)                       # the worker: routes the file tools

A skill is a folder holding a SKILL.md whose YAML front matter has `name` and `description`. discover()
looks in .agents/skills and .claude/skills of the workspace and of each folder above it up to its git root
(nearest wins on a name clash), then $STIGMER_HOME/skills, ~/.agents/skills and ~/.claude/skills. A skill
that breaks a rule is returned with its problem so the caller can print one warning line naming the file
and the rule; it is never used and never crashes.

The model sees a catalogue (name, description, where its SKILL.md is) and reads a SKILL.md when a task
matches (progressive disclosure). The catalogue has a budget of about 2% of the model's context window;
over it, descriptions are cut first, then skills left out, with a warning. A skill folder outside the
workspace is readable by the file tools and read-only (Shelf); the first read of a SKILL.md is a `skill`
event. PyYAML is imported only when a SKILL.md is read.
"""

import os
import posixpath
import re
import threading

NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
ALLOWED = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}


class Skill:
    """A skill as found: its name, description, SKILL.md path and the rules it breaks (none: usable)."""
    __slots__ = ("name", "description", "path", "problems")

    def __init__(self, name, description, path, problems=None):
        self.name, self.description, self.path, self.problems = name, description, path, list(problems or [])

    def __repr__(self):
        return f"Skill({self.name!r}, {self.path!r}, problems={self.problems!r})"

    def __eq__(self, other):
        return isinstance(other, Skill) and (self.name, self.description, self.path, self.problems) == (
            other.name, other.description, other.path, other.problems)

    @property
    def folder(self):
        return os.path.dirname(self.path)


def front_matter(text):
    """The YAML front matter of a SKILL.md, or raise ValueError saying what is wrong."""
    if not text.startswith("---"):
        raise ValueError("SKILL.md must start with YAML front matter (---)")
    parts = text.split("\n")
    for i in range(1, len(parts)):
        if parts[i].rstrip() == "---":
            import yaml
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when present: faster, as safe
            try:
                data = yaml.load("\n".join(parts[1:i]), Loader=loader)
            except yaml.YAMLError as e:
                raise ValueError(f"front matter is not valid YAML ({str(e).splitlines()[0]})")
            if not isinstance(data, dict):
                raise ValueError("front matter must be a YAML mapping")
            return data
    raise ValueError("front matter is not closed with ---")


def check(folder):
    """A Skill for `folder` (following symlinks), its problems listed; never raises."""
    path = os.path.join(folder, "SKILL.md")
    dirname = os.path.basename(os.path.normpath(folder))
    try:
        with open(path, encoding="utf-8") as f:
            data = front_matter(f.read())
    except (OSError, UnicodeDecodeError) as e:
        return Skill(dirname, "", path, [f"cannot read SKILL.md ({e})"])
    except ValueError as e:
        return Skill(dirname, "", path, [str(e)])
    name, description = data.get("name"), data.get("description")
    problems = []
    if not isinstance(name, str) or not name:
        problems.append("missing required field: name")
    elif len(name) > 64:
        problems.append("name is longer than 64 characters")
    elif not NAME_RE.match(name):
        problems.append("name must be lowercase letters, digits and single hyphens, "
                        "not starting or ending with a hyphen")
    elif name != dirname:
        problems.append(f"name {name!r} must equal the folder's name {dirname!r}")
    if not isinstance(description, str) or not description.strip():
        problems.append("missing required field: description")
    elif len(description) > 1024:
        problems.append("description is longer than 1024 characters")
    if "compatibility" in data and (not isinstance(data["compatibility"], str)
                                    or len(data["compatibility"]) > 500):
        problems.append("compatibility must be a string of at most 500 characters")
    if "metadata" in data and not isinstance(data["metadata"], dict):
        problems.append("metadata must be a mapping")
    return Skill(name if isinstance(name, str) and name else dirname,
                 description if isinstance(description, str) else "", path, problems)


def roots(workspace, home):
    """The skill folders to search, nearest first (WORKSPACE None: only the user's)."""
    import agents
    found = []
    for d in agents.project_dirs(workspace) if workspace else ():
        found += [os.path.join(d, ".agents", "skills"), os.path.join(d, ".claude", "skills")]
    if home:
        found.append(os.path.join(home, "skills"))
    user = os.path.expanduser("~")
    found += [os.path.join(user, ".agents", "skills"), os.path.join(user, ".claude", "skills")]
    return found


CACHE_FILE = os.path.join("cache", "skills.json")  # under STIGMER_HOME: SKILL.md files already checked
CACHE_VERSION = 1  # raise it when what check() makes of a file changes
CACHE_MAX = 2000  # entries kept; past it, only those of the latest discovery


def discover(workspace, home):
    """(usable skills sorted by name, skipped skills with their problems). Nearest wins. A SKILL.md unchanged
    since a run checked it (same inode, size, mtime and ctime) is taken from HOME's cache, unparsed: a run with
    many skills needs no `import yaml`."""
    usable, skipped = {}, []
    cache = _load_cache(home)
    seen, dirty = {}, False
    for root in roots(workspace, home):
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            folder = os.path.join(root, entry)
            path = os.path.join(folder, "SKILL.md")
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not os.path.isfile(path):
                continue
            stamp = f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
            kept = cache.get(path)
            if kept and kept[0] == stamp:
                skill = Skill(kept[1], kept[2], path, list(kept[3]))
            else:
                skill, dirty = check(folder), True
            seen[path] = [stamp, skill.name, skill.description, skill.problems]
            if skill.problems:
                skipped.append(skill)
            elif skill.name not in usable:
                usable[skill.name] = skill
    if dirty and home:
        _save_cache(home, seen if len(cache) + len(seen) > CACHE_MAX else {**cache, **seen})
    return [usable[n] for n in sorted(usable)], skipped


def _load_cache(home):
    import json
    try:
        with open(os.path.join(home, CACHE_FILE), encoding="utf-8") as f:
            data = json.load(f)
        return data["entries"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # none yet, or damaged: check again
        return {}


def _save_cache(home, entries):
    import json
    import home as home_mod
    path = os.path.join(home, CACHE_FILE)
    try:
        home_mod.private_dirs(os.path.dirname(path))
        partial = f"{path}.{os.getpid()}"
        fd = home_mod.private_open(partial, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, ensure_ascii=False)
        os.replace(partial, path)
    except OSError:  # a read-only or full STIGMER_HOME: the next run checks the files again, nothing worse
        pass


def command(workspace, home, as_json):
    """`skills`: the skills a run here would offer, then the ones skipped, each with where and its problems."""
    import json
    usable, skipped = discover(workspace, home)
    if as_json:
        for s in usable + skipped:
            print(json.dumps({"name": s.name, "description": s.description, "path": s.path,
                              "problems": s.problems}, ensure_ascii=False))
        return 0
    if not usable and not skipped:
        print("no skills found in " + ", ".join(roots(workspace, home)) + ": put NAME/SKILL.md in one of them")
        return 0
    def shown(s):  # a skipped skill's name may be anything: its folder's name is printable
        return s.name if not s.problems else os.path.basename(s.folder).encode("unicode_escape").decode()
    width = max(len(shown(s)) for s in usable + skipped)
    for s in usable + skipped:
        description = one_line(s.description)[:60] or "-"
        print(f"{shown(s):<{width}}  {description:<60}  {s.path}")
        for problem in s.problems:
            print(f"{'':<{width}}  ! skipped: {problem}")
    return 0


# ---- what a run offers ----

class SkillError(Exception):
    """A skill an agent names cannot be used: one line a person can act on (the CLI exits 2 with it)."""


def select(usable, skipped, refs):
    """The skills an agent's REFS ((slug, base) pairs: skillRefs, in file order) name, sorted by name: a name found
    by discover(), or a path (it holds a /, or starts with . or ~) to a skill folder or its SKILL.md, relative to
    BASE (the folder of the agent file that names it). Raises SkillError for one that does not resolve or breaks
    a rule."""
    by_name = {s.name: s for s in usable}
    broken = {s.name: s for s in skipped}
    chosen = {}
    for ref, base in refs:
        if "/" in ref or ref.startswith((".", "~")):
            folder = os.path.normpath(os.path.join(base, os.path.expanduser(ref)))
            if os.path.basename(folder) == "SKILL.md":
                folder = os.path.dirname(folder)
            if not os.path.isfile(os.path.join(folder, "SKILL.md")):
                raise SkillError(f"skill {ref}: there is no SKILL.md in {folder}")
            skill = check(folder)
            if skill.problems:
                raise SkillError(f"skill {ref} ({skill.path}): {skill.problems[0]}")
        elif ref in by_name:
            skill = by_name[ref]
        elif ref in broken:
            raise SkillError(f"skill {ref} ({broken[ref].path}): {broken[ref].problems[0]}")
        else:
            raise SkillError(f"skill {ref} was not found: put it in .agents/skills/{ref}/SKILL.md (or "
                             "~/.agents/skills), or name its folder by path; `python runner.py skills` lists those found")
        chosen.setdefault(skill.name, skill)
    return [chosen[n] for n in sorted(chosen)]


CATALOGUE_HEAD = (
    "# Skills\n\n"
    "Skills are folders of instructions, scripts and resources for particular kinds of task. When a task matches "
    "a skill's description, read its SKILL.md with read_file before you start and follow it; run the scripts it "
    "names with execute, by their path. A skill's folder outside the workspace is read-only.\n")
BUDGET_SHARE = 0.02  # of the model's context window, for the catalogue ...
CHARS_PER_TOKEN = 4  # ... counted in characters at this rate
BUDGET_UNKNOWN = 8000  # characters, for a model whose context window is not known
DESCRIPTION_MIN = 40  # descriptions are not cut below this many characters: skills are left out instead


def one_line(text):
    return " ".join(text.split())


def entry(name, description, path):
    """One skill's line of the catalogue."""
    return f"\n- {name}: {description} ({path})"


def catalogue(offered):
    """The system prompt's skills section for OFFERED (objects with name, description, path), "" for none."""
    if not offered:
        return ""
    return CATALOGUE_HEAD + "".join(entry(s.name, one_line(s.description), s.path) for s in offered)


def budget(model, override=0):
    """The catalogue's budget in characters for MODEL ("provider/model"; OVERRIDE: STIGMER_CONTEXT_WINDOW)."""
    import models
    window = models.context_window(model, override) if override or models.known_window(model) else 0
    return int(window * BUDGET_SHARE * CHARS_PER_TOKEN) if window else BUDGET_UNKNOWN


def _cut(text, room):
    return text if len(text) <= room else text[:room - 1].rstrip() + "…"


def fit(chosen, limit):
    """(skills, warnings): CHOSEN (Skill, sorted) with their descriptions on one line and the catalogue within
    LIMIT characters: descriptions cut (all to the same length) first, then skills left out from the end."""
    chosen = [Skill(s.name, one_line(s.description), s.path) for s in chosen]
    fixed = [len(entry(s.name, "", s.path)) for s in chosen]  # a line's length without its description
    lengths = [len(s.description) for s in chosen]

    def size(count, room):  # the catalogue's length with the first COUNT skills, descriptions cut to ROOM
        return len(CATALOGUE_HEAD) + sum(fixed[:count]) + sum(min(n, room) for n in lengths[:count])

    longest = max(lengths, default=0)
    if not chosen or size(len(chosen), longest) <= limit:
        return chosen, []
    low, high = DESCRIPTION_MIN, longest  # the longest room that fits, if any does
    if size(len(chosen), low) <= limit:
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if size(len(chosen), mid) <= limit else (low, mid - 1)
        kept = [Skill(s.name, _cut(s.description, low), s.path) for s in chosen]
        return kept, [f"the skills catalogue is over its budget of {limit:,} characters: descriptions are cut to "
                      f"{low} characters"]
    count, total = 0, len(CATALOGUE_HEAD)
    while count < len(chosen) and total + fixed[count] + min(lengths[count], DESCRIPTION_MIN) <= limit:
        total += fixed[count] + min(lengths[count], DESCRIPTION_MIN)
        count += 1
    kept = [Skill(s.name, _cut(s.description, DESCRIPTION_MIN), s.path) for s in chosen[:count]]
    left = [s.name for s in chosen[count:]]
    named = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    return kept, [f"the skills catalogue is over its budget of {limit:,} characters: descriptions are cut to "
                  f"{DESCRIPTION_MIN} characters and {len(left)} skill{'s' if len(left) != 1 else ''} left out "
                  f"({named}); name the ones this agent needs in its skillRefs"]


UPLOAD_MAX = 8 << 20  # bytes of skill files a run may upload into a remote sandbox
SKIP_DIRS = (".git", "__pycache__", "node_modules")


def files(folder):
    """[(relative path with /, bytes, executable)] of the regular files in FOLDER (symlinks followed, SKIP_DIRS
    left out), sorted; raises SkillError past UPLOAD_MAX bytes in all (total: the caller's running count)."""
    found = []
    real = os.path.realpath(folder)
    inside = lambda path: path == real or path.startswith(real.rstrip(os.sep) + os.sep)  # noqa: E731
    seen = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(top))
        # A symlink is followed while it stays in the skill's folder: never out of it (a project's skill must not
        # carry the user's files into a sandbox), never round a loop.
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and inside(os.path.realpath(os.path.join(top, d)))
                         and os.path.realpath(os.path.join(top, d)) not in seen)
        for name in sorted(names):
            full = os.path.join(top, name)
            if not inside(os.path.realpath(full)):
                continue
            try:
                st = os.stat(full)
                if not os.path.isfile(full):
                    continue
                with open(full, "rb") as f:
                    data = f.read(UPLOAD_MAX + 1)
            except OSError as e:
                raise SkillError(f"cannot read {full} of skill {os.path.basename(folder)}: {e.strerror}") from None
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            found.append((rel, data, bool(st.st_mode & 0o111)))
    return found


# ---- the worker: the agent reads skills ----

class Shelf:
    """The skills of one execution as its agent sees them: pb.Skill (or Skill) with the paths the agent uses,
    and BOX, the execution's sandbox. Folders outside BOX's root are read through a view of their own
    (box.view(folder)) and refuse writes; first_read() says when a SKILL.md is read for the first time.
    Shared by an execution's agent and its sub-agents (thread-safe)."""

    def __init__(self, skills, box):
        self.skills = list(skills)
        self.box = box
        self._views, self._read, self._lock = {}, set(), threading.Lock()
        self.root = box.root.rstrip("/") + "/"
        self._outside = []  # (prefix with a trailing /, skill), longest first: the folders outside the workspace
        for s in self.skills:
            real = s.folder.rstrip("/") if getattr(box, "id", None) else os.path.realpath(s.folder)
            if (real + "/").startswith(self.root):
                continue  # in the workspace (a symlink to it included): the workspace's own tools serve it
            for p in {s.folder.rstrip("/"), real}:  # a folder reached through a symlink: both ways
                self._outside.append((p + "/", s))
        self._outside.sort(key=lambda item: -len(item[0]))
        self._skill_files = {}
        for s in self.skills:
            self._skill_files[posixpath.normpath(s.path)] = s
            if not getattr(box, "id", None):
                self._skill_files[os.path.realpath(s.path)] = s

    def _find(self, path):
        """(prefix, skill) of the skill folder outside the workspace that PATH (absolute, or relative to the
        workspace: ../.agents/skills/x) is in, or (None, None)."""
        if not isinstance(path, str) or not path or "\0" in path:
            return None, None
        norm = posixpath.normpath(posixpath.join(self.box.root, path)) + "/"
        for prefix, skill in self._outside:
            if norm.startswith(prefix) and not (self.root.startswith(prefix) and norm.startswith(self.root)):
                return prefix, skill  # (a workspace inside a skill's folder is the workspace: writable)
        return None, None

    def route(self, path):
        """(box, path) the file tools use for PATH: a skill folder's view and the path inside it, else the
        execution's sandbox and PATH unchanged."""
        prefix, skill = self._find(path)
        if skill is None:
            return self.box, path
        with self._lock:
            view = self._views.get(prefix)
            if view is None:
                from sandbox import SandboxError
                if not getattr(self.box, "id", None) and not os.path.isdir(prefix):
                    raise SandboxError(f"the folder of skill {skill.name} ({prefix.rstrip('/')}) is not on this "
                                       "runner's host")
                view = self._views[prefix] = self.box.view(prefix.rstrip("/"))
        return view, prefix.rstrip("/") + "/" + (posixpath.normpath(posixpath.join(self.box.root, path))[len(prefix):]
                                                  or ".")

    def check_write(self, path):
        """Raise SandboxError when PATH is in a skill's folder outside the workspace (read-only)."""
        _, skill = self._find(path)
        if skill is not None:
            from sandbox import SandboxError
            raise SandboxError(f"{path} is in the folder of skill {skill.name}, which is read-only: copy what you "
                               "need into the workspace and change it there")

    def first_read(self, path):
        """The skill whose SKILL.md PATH (absolute, or relative to the workspace) is, the first time it is read
        in this execution; else None."""
        if not self.skills or not isinstance(path, str):
            return None
        full = posixpath.normpath(posixpath.join(self.box.root, path))
        skill = self._skill_files.get(full)
        if skill is None and not getattr(self.box, "id", None):
            skill = self._skill_files.get(os.path.realpath(full))
        if skill is None:
            return None
        with self._lock:
            if skill.name in self._read:
                return None
            self._read.add(skill.name)
        return skill
