from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PENDING: _ClassVar[Phase]
    RUNNING: _ClassVar[Phase]
    COMPLETED: _ClassVar[Phase]
    FAILED: _ClassVar[Phase]
    CANCELLED: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PENDING: Phase
RUNNING: Phase
COMPLETED: Phase
FAILED: Phase
CANCELLED: Phase

class ExecutionSpec(_message.Message):
    __slots__ = ("prompt", "workspace", "model", "max_turns", "secret_names", "max_tokens_total", "runner_id", "repo", "ref", "keep_sandbox", "sandbox", "parent_id", "agent", "project_docs", "sandbox_mode", "network", "no_patch", "approval", "skills", "mcp_servers")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    REPO_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    KEEP_SANDBOX_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_DOCS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_MODE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    NO_PATCH_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    workspace: str
    model: str
    max_turns: int
    secret_names: _containers.RepeatedScalarFieldContainer[str]
    max_tokens_total: int
    runner_id: str
    repo: str
    ref: str
    keep_sandbox: bool
    sandbox: str
    parent_id: str
    agent: AgentSpec
    project_docs: _containers.RepeatedCompositeFieldContainer[ProjectDoc]
    sandbox_mode: str
    network: bool
    no_patch: bool
    approval: ApprovalPolicy
    skills: _containers.RepeatedCompositeFieldContainer[Skill]
    mcp_servers: _containers.RepeatedCompositeFieldContainer[McpServerDefinition]
    def __init__(self, prompt: _Optional[str] = ..., workspace: _Optional[str] = ..., model: _Optional[str] = ..., max_turns: _Optional[int] = ..., secret_names: _Optional[_Iterable[str]] = ..., max_tokens_total: _Optional[int] = ..., runner_id: _Optional[str] = ..., repo: _Optional[str] = ..., ref: _Optional[str] = ..., keep_sandbox: _Optional[bool] = ..., sandbox: _Optional[str] = ..., parent_id: _Optional[str] = ..., agent: _Optional[_Union[AgentSpec, _Mapping]] = ..., project_docs: _Optional[_Iterable[_Union[ProjectDoc, _Mapping]]] = ..., sandbox_mode: _Optional[str] = ..., network: _Optional[bool] = ..., no_patch: _Optional[bool] = ..., approval: _Optional[_Union[ApprovalPolicy, _Mapping]] = ..., skills: _Optional[_Iterable[_Union[Skill, _Mapping]]] = ..., mcp_servers: _Optional[_Iterable[_Union[McpServerDefinition, _Mapping]]] = ...) -> None: ...

class Skill(_message.Message):
    __slots__ = ("name", "description", "path", "folder", "files")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    path: str
    folder: str
    files: _containers.RepeatedCompositeFieldContainer[SkillFile]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., path: _Optional[str] = ..., folder: _Optional[str] = ..., files: _Optional[_Iterable[_Union[SkillFile, _Mapping]]] = ...) -> None: ...

class SkillFile(_message.Message):
    __slots__ = ("path", "data", "executable")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXECUTABLE_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    executable: bool
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ..., executable: _Optional[bool] = ...) -> None: ...

class ProjectDoc(_message.Message):
    __slots__ = ("path", "text", "size", "truncated")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    path: str
    text: str
    size: int
    truncated: bool
    def __init__(self, path: _Optional[str] = ..., text: _Optional[str] = ..., size: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class AgentSpec(_message.Message):
    __slots__ = ("description", "icon_url", "instructions", "mcp_servers", "skill_refs", "sub_agents", "env_spec", "name", "labels", "source", "config", "approval")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ICON_URL_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    SKILL_REFS_FIELD_NUMBER: _ClassVar[int]
    SUB_AGENTS_FIELD_NUMBER: _ClassVar[int]
    ENV_SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    description: str
    icon_url: str
    instructions: str
    mcp_servers: _containers.RepeatedCompositeFieldContainer[McpServerDefinition]
    skill_refs: _containers.RepeatedCompositeFieldContainer[SkillRef]
    sub_agents: _containers.RepeatedCompositeFieldContainer[SubAgent]
    env_spec: EnvironmentSpec
    name: str
    labels: _containers.ScalarMap[str, str]
    source: str
    config: AgentConfig
    approval: str
    def __init__(self, description: _Optional[str] = ..., icon_url: _Optional[str] = ..., instructions: _Optional[str] = ..., mcp_servers: _Optional[_Iterable[_Union[McpServerDefinition, _Mapping]]] = ..., skill_refs: _Optional[_Iterable[_Union[SkillRef, _Mapping]]] = ..., sub_agents: _Optional[_Iterable[_Union[SubAgent, _Mapping]]] = ..., env_spec: _Optional[_Union[EnvironmentSpec, _Mapping]] = ..., name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., source: _Optional[str] = ..., config: _Optional[_Union[AgentConfig, _Mapping]] = ..., approval: _Optional[str] = ...) -> None: ...

class AgentConfig(_message.Message):
    __slots__ = ("model", "temperature", "max_tokens", "network")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    model: str
    temperature: float
    max_tokens: int
    network: bool
    def __init__(self, model: _Optional[str] = ..., temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., network: _Optional[bool] = ...) -> None: ...

class McpServerDefinition(_message.Message):
    __slots__ = ("name", "stdio", "http", "docker", "enabled_tools", "call_timeout_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    DOCKER_FIELD_NUMBER: _ClassVar[int]
    ENABLED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    CALL_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    stdio: StdioServer
    http: HttpServer
    docker: DockerServer
    enabled_tools: _containers.RepeatedScalarFieldContainer[str]
    call_timeout_seconds: int
    def __init__(self, name: _Optional[str] = ..., stdio: _Optional[_Union[StdioServer, _Mapping]] = ..., http: _Optional[_Union[HttpServer, _Mapping]] = ..., docker: _Optional[_Union[DockerServer, _Mapping]] = ..., enabled_tools: _Optional[_Iterable[str]] = ..., call_timeout_seconds: _Optional[int] = ...) -> None: ...

class StdioServer(_message.Message):
    __slots__ = ("command", "args", "env_placeholders", "working_dir")
    class EnvPlaceholdersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_PLACEHOLDERS_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env_placeholders: _containers.ScalarMap[str, str]
    working_dir: str
    def __init__(self, command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env_placeholders: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ...) -> None: ...

class HttpServer(_message.Message):
    __slots__ = ("url", "headers", "query_params", "timeout_seconds")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class QueryParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    URL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    QUERY_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    url: str
    headers: _containers.ScalarMap[str, str]
    query_params: _containers.ScalarMap[str, str]
    timeout_seconds: int
    def __init__(self, url: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., query_params: _Optional[_Mapping[str, str]] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class DockerServer(_message.Message):
    __slots__ = ("image", "args", "env_placeholders", "volumes", "network", "ports", "container_name")
    class EnvPlaceholdersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_PLACEHOLDERS_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    image: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env_placeholders: _containers.ScalarMap[str, str]
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeMount]
    network: str
    ports: _containers.RepeatedCompositeFieldContainer[PortMapping]
    container_name: str
    def __init__(self, image: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env_placeholders: _Optional[_Mapping[str, str]] = ..., volumes: _Optional[_Iterable[_Union[VolumeMount, _Mapping]]] = ..., network: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[PortMapping, _Mapping]]] = ..., container_name: _Optional[str] = ...) -> None: ...

class VolumeMount(_message.Message):
    __slots__ = ("host_path", "container_path", "read_only")
    HOST_PATH_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    host_path: str
    container_path: str
    read_only: bool
    def __init__(self, host_path: _Optional[str] = ..., container_path: _Optional[str] = ..., read_only: _Optional[bool] = ...) -> None: ...

class PortMapping(_message.Message):
    __slots__ = ("host_port", "container_port", "protocol")
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    host_port: int
    container_port: int
    protocol: str
    def __init__(self, host_port: _Optional[int] = ..., container_port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class SkillRef(_message.Message):
    __slots__ = ("scope", "org", "kind", "slug", "version")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    scope: str
    org: str
    kind: str
    slug: str
    version: str
    def __init__(self, scope: _Optional[str] = ..., org: _Optional[str] = ..., kind: _Optional[str] = ..., slug: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SubAgent(_message.Message):
    __slots__ = ("name", "description", "instructions", "mcp_servers", "mcp_tool_selections", "skill_refs", "agent", "agent_spec")
    class McpToolSelectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: McpToolSelection
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[McpToolSelection, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    MCP_TOOL_SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    SKILL_REFS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    instructions: str
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    mcp_tool_selections: _containers.MessageMap[str, McpToolSelection]
    skill_refs: _containers.RepeatedCompositeFieldContainer[SkillRef]
    agent: str
    agent_spec: AgentSpec
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., instructions: _Optional[str] = ..., mcp_servers: _Optional[_Iterable[str]] = ..., mcp_tool_selections: _Optional[_Mapping[str, McpToolSelection]] = ..., skill_refs: _Optional[_Iterable[_Union[SkillRef, _Mapping]]] = ..., agent: _Optional[str] = ..., agent_spec: _Optional[_Union[AgentSpec, _Mapping]] = ...) -> None: ...

class McpToolSelection(_message.Message):
    __slots__ = ("enabled_tools",)
    ENABLED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    enabled_tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, enabled_tools: _Optional[_Iterable[str]] = ...) -> None: ...

class EnvironmentSpec(_message.Message):
    __slots__ = ("description", "data")
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EnvironmentValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EnvironmentValue, _Mapping]] = ...) -> None: ...
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    description: str
    data: _containers.MessageMap[str, EnvironmentValue]
    def __init__(self, description: _Optional[str] = ..., data: _Optional[_Mapping[str, EnvironmentValue]] = ...) -> None: ...

class EnvironmentValue(_message.Message):
    __slots__ = ("value", "is_secret", "description")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    IS_SECRET_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    value: str
    is_secret: bool
    description: str
    def __init__(self, value: _Optional[str] = ..., is_secret: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "skills")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    skills: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., skills: _Optional[_Iterable[str]] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("id", "spec", "phase", "created_at", "started_at", "finished_at", "runner_id", "usage", "final_text", "error", "last_seq", "turns", "not_stored", "waiting_approvals")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    NOT_STORED_FIELD_NUMBER: _ClassVar[int]
    WAITING_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: ExecutionSpec
    phase: Phase
    created_at: float
    started_at: float
    finished_at: float
    runner_id: str
    usage: Usage
    final_text: str
    error: str
    last_seq: int
    turns: int
    not_stored: bool
    waiting_approvals: int
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[ExecutionSpec, _Mapping]] = ..., phase: _Optional[_Union[Phase, str]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., runner_id: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., final_text: _Optional[str] = ..., error: _Optional[str] = ..., last_seq: _Optional[int] = ..., turns: _Optional[int] = ..., not_stored: _Optional[bool] = ..., waiting_approvals: _Optional[int] = ...) -> None: ...

class PhaseChange(_message.Message):
    __slots__ = ("phase", "reason", "final_text", "turns", "model", "agent", "sandbox_mode", "network")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_MODE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    reason: str
    final_text: str
    turns: int
    model: str
    agent: str
    sandbox_mode: str
    network: bool
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., reason: _Optional[str] = ..., final_text: _Optional[str] = ..., turns: _Optional[int] = ..., model: _Optional[str] = ..., agent: _Optional[str] = ..., sandbox_mode: _Optional[str] = ..., network: _Optional[bool] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "input_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    input_json: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., input_json: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("id", "is_error", "exit_code", "output", "truncated", "duration_ms", "images")
    ID_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    id: str
    is_error: bool
    exit_code: int
    output: str
    truncated: bool
    duration_ms: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, id: _Optional[str] = ..., is_error: _Optional[bool] = ..., exit_code: _Optional[int] = ..., output: _Optional[str] = ..., truncated: _Optional[bool] = ..., duration_ms: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("media_type", "data")
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    media_type: str
    data: bytes
    def __init__(self, media_type: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "source", "system", "project_docs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    PROJECT_DOCS_FIELD_NUMBER: _ClassVar[int]
    text: str
    source: str
    system: str
    project_docs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., source: _Optional[str] = ..., system: _Optional[str] = ..., project_docs: _Optional[_Iterable[str]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("number", "stop", "text", "context_tokens")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    number: int
    stop: str
    text: str
    context_tokens: int
    def __init__(self, number: _Optional[int] = ..., stop: _Optional[str] = ..., text: _Optional[str] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class ContextCleared(_message.Message):
    __slots__ = ("results", "tokens_before", "tokens_after", "ids", "window")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_AFTER_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    results: int
    tokens_before: int
    tokens_after: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    window: int
    def __init__(self, results: _Optional[int] = ..., tokens_before: _Optional[int] = ..., tokens_after: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., window: _Optional[int] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("call_id", "stream", "text")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    stream: str
    text: str
    def __init__(self, call_id: _Optional[str] = ..., stream: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("type", "name", "text", "size", "truncated", "notes", "created_in")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_IN_FIELD_NUMBER: _ClassVar[int]
    type: str
    name: str
    text: str
    size: int
    truncated: bool
    notes: str
    created_in: float
    def __init__(self, type: _Optional[str] = ..., name: _Optional[str] = ..., text: _Optional[str] = ..., size: _Optional[int] = ..., truncated: _Optional[bool] = ..., notes: _Optional[str] = ..., created_in: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("execution_id", "seq", "time", "subagent", "task_call_id", "depth", "phase", "text", "tool_call", "tool_result", "usage", "error", "artifact", "prompt", "turn", "context_cleared", "output", "skill", "approval_request", "approval")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SUBAGENT_FIELD_NUMBER: _ClassVar[int]
    TASK_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CLEARED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SKILL_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    seq: int
    time: float
    subagent: str
    task_call_id: str
    depth: int
    phase: PhaseChange
    text: TextDelta
    tool_call: ToolCall
    tool_result: ToolResult
    usage: Usage
    error: Error
    artifact: Artifact
    prompt: Prompt
    turn: Turn
    context_cleared: ContextCleared
    output: Output
    skill: SkillUsed
    approval_request: ApprovalRequest
    approval: Approval
    def __init__(self, execution_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., subagent: _Optional[str] = ..., task_call_id: _Optional[str] = ..., depth: _Optional[int] = ..., phase: _Optional[_Union[PhaseChange, _Mapping]] = ..., text: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., turn: _Optional[_Union[Turn, _Mapping]] = ..., context_cleared: _Optional[_Union[ContextCleared, _Mapping]] = ..., output: _Optional[_Union[Output, _Mapping]] = ..., skill: _Optional[_Union[SkillUsed, _Mapping]] = ..., approval_request: _Optional[_Union[ApprovalRequest, _Mapping]] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ExecutionSpec
    def __init__(self, spec: _Optional[_Union[ExecutionSpec, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("execution_id",)
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    def __init__(self, execution_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("phase", "limit", "page_token")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    limit: int
    page_token: str
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("executions", "next_page_token")
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    executions: _containers.RepeatedCompositeFieldContainer[Execution]
    next_page_token: str
    def __init__(self, executions: _Optional[_Iterable[_Union[Execution, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("execution_id", "after_seq", "follow")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    after_seq: int
    follow: bool
    def __init__(self, execution_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("execution_id",)
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    def __init__(self, execution_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DaemonStatus(_message.Message):
    __slots__ = ("version", "pid", "uptime_seconds", "connected_runners", "queue_depth", "executions_by_phase", "free_capacity")
    class ExecutionsByPhaseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_RUNNERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    EXECUTIONS_BY_PHASE_FIELD_NUMBER: _ClassVar[int]
    FREE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    uptime_seconds: float
    connected_runners: int
    queue_depth: int
    executions_by_phase: _containers.ScalarMap[str, int]
    free_capacity: int
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., connected_runners: _Optional[int] = ..., queue_depth: _Optional[int] = ..., executions_by_phase: _Optional[_Mapping[str, int]] = ..., free_capacity: _Optional[int] = ...) -> None: ...

class InFlight(_message.Message):
    __slots__ = ("execution_id", "last_seq")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    last_seq: int
    def __init__(self, execution_id: _Optional[str] = ..., last_seq: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("runner_id", "capacity", "mode", "in_flight", "pinned")
    RUNNER_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    runner_id: str
    capacity: int
    mode: str
    in_flight: _containers.RepeatedCompositeFieldContainer[InFlight]
    pinned: bool
    def __init__(self, runner_id: _Optional[str] = ..., capacity: _Optional[int] = ..., mode: _Optional[str] = ..., in_flight: _Optional[_Iterable[_Union[InFlight, _Mapping]]] = ..., pinned: _Optional[bool] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("free_slots",)
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    free_slots: int
    def __init__(self, free_slots: _Optional[int] = ...) -> None: ...

class RunnerMessage(_message.Message):
    __slots__ = ("hello", "events", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    events: EventBatch
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., events: _Optional[_Union[EventBatch, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Assign(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("execution_id", "seq")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    seq: int
    def __init__(self, execution_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class CancelExecution(_message.Message):
    __slots__ = ("execution_id",)
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    def __init__(self, execution_id: _Optional[str] = ...) -> None: ...

class Reject(_message.Message):
    __slots__ = ("execution_id", "code", "message", "ack_seq")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACK_SEQ_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    code: int
    message: str
    ack_seq: int
    def __init__(self, execution_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., ack_seq: _Optional[int] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("assign", "ack", "cancel", "reject", "approval")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    assign: Assign
    ack: Ack
    cancel: CancelExecution
    reject: Reject
    approval: ApprovalAnswer
    def __init__(self, assign: _Optional[_Union[Assign, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., cancel: _Optional[_Union[CancelExecution, _Mapping]] = ..., reject: _Optional[_Union[Reject, _Mapping]] = ..., approval: _Optional[_Union[ApprovalAnswer, _Mapping]] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("execution_id", "request_id", "approved", "reason", "always", "by")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ALWAYS_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    request_id: str
    approved: bool
    reason: str
    always: bool
    by: str
    def __init__(self, execution_id: _Optional[str] = ..., request_id: _Optional[str] = ..., approved: _Optional[bool] = ..., reason: _Optional[str] = ..., always: _Optional[bool] = ..., by: _Optional[str] = ...) -> None: ...

class ApprovalAnswer(_message.Message):
    __slots__ = ("execution_id", "approval")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    approval: Approval
    def __init__(self, execution_id: _Optional[str] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ...) -> None: ...

class ApproveResponse(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class SkillUsed(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ApprovalPolicy(_message.Message):
    __slots__ = ("mode", "allow", "deny", "timeout_seconds")
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    DENY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    allow: _containers.RepeatedScalarFieldContainer[str]
    deny: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: float
    def __init__(self, mode: _Optional[str] = ..., allow: _Optional[_Iterable[str]] = ..., deny: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("id", "tool", "command", "path", "diff", "reason", "input_json", "call_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    tool: str
    command: str
    path: str
    diff: str
    reason: str
    input_json: str
    call_id: str
    def __init__(self, id: _Optional[str] = ..., tool: _Optional[str] = ..., command: _Optional[str] = ..., path: _Optional[str] = ..., diff: _Optional[str] = ..., reason: _Optional[str] = ..., input_json: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("id", "approved", "reason", "always", "rule", "by")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ALWAYS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    approved: bool
    reason: str
    always: bool
    rule: str
    by: str
    def __init__(self, id: _Optional[str] = ..., approved: _Optional[bool] = ..., reason: _Optional[str] = ..., always: _Optional[bool] = ..., rule: _Optional[str] = ..., by: _Optional[str] = ...) -> None: ...
