"""Agent Skills: find SKILL.md folders and check them against the Agent Skills standard.

A skill is a folder holding a SKILL.md whose YAML front matter has `name` and
`description`. discover() looks in the workspace's .agents/skills and .claude/skills up to
its git root (nearest wins on a name clash), then $STIGMER_HOME/skills, ~/.agents/skills and
~/.claude/skills. A skill that breaks a rule is returned with its problem so the caller can
print one warning line naming the file and the rule; it is never used and never crashes.
"""

import os
import re
from dataclasses import dataclass, field

import yaml

NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
ALLOWED = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}


@dataclass
class Skill:
    name: str
    description: str
    path: str  # the SKILL.md file
    problems: list = field(default_factory=list)

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
            try:
                data = yaml.safe_load("\n".join(parts[1:i]))
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
    """The skill folders to search, nearest first."""
    found = []
    d = os.path.abspath(workspace)
    while True:
        found += [os.path.join(d, ".agents", "skills"), os.path.join(d, ".claude", "skills")]
        parent = os.path.dirname(d)
        if os.path.exists(os.path.join(d, ".git")) or parent == d:
            break
        d = parent
    if home:
        found.append(os.path.join(home, "skills"))
    user = os.path.expanduser("~")
    found += [os.path.join(user, ".agents", "skills"), os.path.join(user, ".claude", "skills")]
    return found


def discover(workspace, home):
    """(usable skills sorted by name, skipped skills with their problems). Nearest wins."""
    usable, skipped = {}, []
    for root in roots(workspace, home):
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            folder = os.path.join(root, entry)
            if not os.path.isfile(os.path.join(folder, "SKILL.md")):
                continue
            skill = check(folder)
            if skill.problems:
                skipped.append(skill)
            elif skill.name not in usable:
                usable[skill.name] = skill
    return [usable[n] for n in sorted(usable)], skipped


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
    width = max(len(s.name) for s in usable + skipped)
    for s in usable + skipped:
        description = s.description.splitlines()[0][:60] if s.description else "-"
        print(f"{s.name:<{width}}  {description:<60}  {s.path}")
        for problem in s.problems:
            print(f"{'':<{width}}  ! skipped: {problem}")
    return 0
