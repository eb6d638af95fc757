"""Sub-agents: the `task` tool, with which an agent hands a piece of work to another agent of the same execution.

    team = subagents.Team(spec.agent.instructions, spec.agent.sub_agents)   # declared ones plus general-purpose
    the_agent = agent.Agent(model, box, emit, ..., team=team)                # offers `task` while depth < MAX_DEPTH

A sub-agent is an `agent.Agent` of its own over the same sandbox and workspace, with a fresh conversation (its
system prompt: its instructions, the runner's part, the project's AGENTS.md), its own turn limit (the execution's
max_turns) and the execution's token budget, which its usage adds to. The task tool's result is its final text
(capped and redacted like any tool result); a sub-agent that fails (turn limit, provider error) is an error result,
and the parent goes on. Several task calls of one turn run at the same time, each on a thread of its own.

Its events go into the execution's log through the same emit, each tagged with the sub-agent's name
(Event.subagent), the id of the task call that started it (Event.task_call_id) and its depth (Event.depth): the
log stays one contiguous sequence. A sub-agent streams no text deltas (two running at once would interleave); its
turn events carry its text. agent.rebuild() skips tagged events: a resumed conversation is the parent's alone.

The members of a Team: every agent has GENERAL_PURPOSE (the agent's own instructions and tools, as in
deepagents); an agent file adds its spec.subAgents: inline ones (their instructions; they may start a
general-purpose of their own) and references to other agent files (agents.resolve_sub_agents read them into
sub.agent_spec; they may start that agent's own sub-agents). A sub-agent at MAX_DEPTH gets no task tool.

MCP tools: general-purpose has all of its parent's; a declared sub-agent those of the parent's servers its
mcpServers names, narrowed by its mcpToolSelections (none when it names none). Skills: every agent of the
execution sees the execution's catalogue (its sub-agents' skillRefs were added to it at submit).
"""
import copy
import json
import logging
import threading

import stigmer_pb2 as pb

log = logging.getLogger("stigmer.subagents")

TASK = "task"  # the tool's name
GENERAL_PURPOSE = "general-purpose"  # the sub-agent every agent has (agents.GENERAL_PURPOSE: no file may declare it)
MAX_DEPTH = 2  # a sub-agent of a sub-agent (depth 2) starts no sub-agents of its own
GENERAL_DESCRIPTION = ("A general-purpose agent with your own instructions and tools: for researching a question, "
                       "searching the code or carrying out a self-contained, multi-step part of the work while "
                       "keeping its details out of your conversation.")
TASK_DESCRIPTION = """Hand a self-contained piece of work to a sub-agent. It works in the same workspace with the same kind of tools, in a fresh conversation of its own that starts from your description alone, and its final answer comes back to you as this tool's result (you do not see its steps). Use it for work that would fill your conversation with detail (searching a large codebase, running and fixing a test suite, reviewing a change) or that can go on in parallel: several task calls in one reply run at the same time. Write the description as a complete brief: what to do, where, what you already know and what to report back. The sub-agents:
{members}"""
NO_ANSWER = "(the sub-agent ended without a final answer)"


class Member:
    """One sub-agent an agent may start: its name, description, instructions and the sub-agents it may start."""

    def __init__(self, name, description, instructions, sub_agents=(), mcp=None):
        self.name, self.description, self.instructions = name, description, instructions
        self.sub_agents = list(sub_agents)  # pb.SubAgent: what its own Team declares (besides general-purpose)
        self.mcp = mcp  # {server: tool names, or None for all} it may use; None: all of its parent's


class Team:
    """The sub-agents an agent may start, general-purpose first then the declared ones in file order, and the task
    tool's spec that lists them (the same bytes on every request of the conversation)."""

    def __init__(self, instructions="", sub_agents=()):
        self.instructions = instructions  # the agent's own: general-purpose's
        self.members = {GENERAL_PURPOSE: Member(GENERAL_PURPOSE, GENERAL_DESCRIPTION, instructions, sub_agents)}
        for sub in sub_agents:
            own = sub.agent_spec.sub_agents if sub.agent else ()  # a referenced agent file brings its own
            mcp = {server: set(sub.mcp_tool_selections[server].enabled_tools) or None
                   if server in sub.mcp_tool_selections else None for server in sub.mcp_servers}
            self.members[sub.name] = Member(sub.name, sub.description or "(no description)", sub.instructions, own,
                                            mcp)
        listed = "\n".join(f"- {m.name}: {' '.join(m.description.split())}" for m in self.members.values())
        self.spec = {"name": TASK, "description": TASK_DESCRIPTION.format(members=listed),
                     "input_schema": {"type": "object", "properties": {
                         "description": {"type": "string", "description": "The work to do, as a complete brief: the "
                                         "sub-agent sees nothing of your conversation."},
                         "subagent_type": {"type": "string", "enum": list(self.members),
                                           "description": "Which sub-agent does it (one of the names above)."}},
                         "required": ["description", "subagent_type"]}}

    def team_of(self, member):
        """The Team MEMBER's own agent offers one level further down."""
        return Team(member.instructions, member.sub_agents)


def run_task(parent, call):
    """Run the task tool call CALL (models.ToolUse) of PARENT (an agent.Agent) to the end: a child Agent over
    PARENT's sandbox. Returns (output, is_error, exit_code, truncated) like any tool; never raises."""
    args = call.input
    member = parent.team.members.get(args.get("subagent_type"))
    if member is None:
        names = ", ".join(parent.team.members)
        return f"unknown sub-agent {args.get('subagent_type')!r}; the sub-agents are: {names}", True, 2, False
    if not args.get("description", "").strip():
        return "the description is empty: say what the sub-agent should do and report back", True, 2, False
    model = copy.copy(parent.model)  # the same client and settings; a stream of its own (cancel closes it)
    model._stream = None
    child = type(parent)(model, parent.sandbox, parent.sink, max_turns=parent.max_turns,
                         max_tokens_total=parent.max_tokens_total, redactor=parent.redactor,
                         shell_env=parent.shell_env, context_window=parent.context_window,
                         instructions=member.instructions, project_docs=parent.project_docs,
                         team=parent.team.team_of(member) if parent.depth + 1 < MAX_DEPTH else None,
                         depth=parent.depth + 1, subagent=member.name, task_call_id=call.id, skills=parent.skills,
                         mcp=parent.mcp, mcp_filter=narrowed(parent.mcp_filter, member.mcp), gate=parent.gate)
    child.usage, child.usage_lock = parent.usage, parent.usage_lock  # the execution's, one budget
    with parent.children_lock:
        parent.children.add(child)
    if parent.cancelled.is_set():  # cancelled while it was being made: cancel() did not see it
        child.cancel()
    try:
        phase, reason, text = child.run(args["description"], parent.workspace)
    except Exception as exc:  # a bug in the runner: the parent gets an error result, the execution goes on
        log.exception("sub-agent %s of task call %s crashed", member.name, call.id)
        reason = f"internal runner error: {type(exc).__name__}: {exc}"
        child.emit(error=pb.Error(code="internal", message=reason))  # the worker redacts every event
        phase, text = pb.FAILED, ""
    finally:
        with parent.children_lock:
            parent.children.discard(child)
    if phase == pb.COMPLETED:
        return text or NO_ANSWER, False, 0, False
    if phase == pb.CANCELLED:
        return f"sub-agent {member.name} was cancelled: {reason}", True, 130, False
    turns = f" after {child.turns} turn{'s' if child.turns != 1 else ''}"
    return f"sub-agent {member.name} failed{turns}: {reason}", True, 1, False


def narrowed(parent, own):
    """The MCP tools a sub-agent may use ({server: tool names or None for all}, None for all): OWN (its member's)
    within PARENT (what its parent may use)."""
    if own is None:
        return parent
    if parent is None:
        return own
    return {server: (tools if parent[server] is None else parent[server] if tools is None else tools & parent[server])
            for server, tools in own.items() if server in parent}


def describe_call(input_json):
    """(subagent_type, description) of a task call's logged input, for showing it; ("", "") when unreadable."""
    try:
        args = json.loads(input_json)
    except ValueError:
        return "", ""
    if not isinstance(args, dict):
        return "", ""
    return str(args.get("subagent_type", "")), str(args.get("description", ""))


def start(target, *args):
    """TARGET(*args) on a daemon thread of its own (a task call of a turn), started; returns the thread."""
    thread = threading.Thread(target=target, args=args, name="task", daemon=True)
    thread.start()
    return thread
