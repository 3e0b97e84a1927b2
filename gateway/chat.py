"""An OpenAI chat-completions request body -> the `crema` ensemble's input tensors.

The model answers one question about one clip: the request's one user message is the question (its
text, parts joined) with its media; system/developer messages are ignored (the model has no system
prompt); assistant messages (a conversation's history) are refused, since the model cannot read
them. Parameters the model cannot honour are refused naming the field; those given at the value that
means "as the model does anyway" (n=1, temperature 0, ...) are accepted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from triton_models.client import request_tensors

from .errors import ApiError
from .media import Media

ROLES_IGNORED = ("system", "developer")
TASKS = ("oeqa", "mcqa")
AUDIO_FORMATS = ("wav", "flac", "ogg")  # what the server decodes (it sniffs the content; the name is checked)
# parameter -> the values accepted (the no-op ones); any other value is refused naming it
NO_OP = {"n": (None, 1), "temperature": (None, 0), "top_p": (None, 1), "presence_penalty": (None, 0),
         "frequency_penalty": (None, 0), "logprobs": (None, False), "top_logprobs": (None, 0), "stop": (None,),
         "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
         "function_call": (None, "none"), "parallel_tool_calls": (None, False, True), "audio": (None,),
         "modalities": (None, ["text"]), "response_format": (None, {"type": "text"}), "store": (None, False),
         "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default")}
FREE = ("user", "seed", "metadata")  # accepted, no effect (decoding is deterministic: seed changes nothing)
KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "crema",
         *NO_OP, *FREE}
CREMA_OPTIONS = ("task", "num_beams", "depth", "pc", "options", "situation", "templ_values")


@dataclass
class ChatRequest:
    question: str
    tensors: dict[str, np.ndarray]
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a final chunk with usage
    media: dict[str, int] = field(default_factory=dict)  # what was sent: field -> bytes


def parse_json(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError("the request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(request, dict):
        raise ApiError("the request body must be a JSON object", None, "invalid_json")
    return request


def parse_chat(request: dict, model: str, media: Media) -> ChatRequest:
    """A parsed JSON body -> ChatRequest; ApiError naming the field otherwise."""
    _check_parameters(request, model)
    text, parts = _user_message(request["messages"])
    tensors: dict = {"video": None, "audio": None, "depth": None, "pc_feat": None, "pc_coords": None}
    sizes = {}
    for param, kind, value in parts:
        key = "video" if kind == "video_url" else "audio"
        if tensors[key] is not None:
            raise ApiError(f"{param}: a second {kind} part (the model takes one {key})", param, "duplicate_media")
        tensors[key] = media.bytes_of(value, param)
        sizes[param] = len(tensors[key])
    crema = _object(request.get("crema", {}), "crema")
    unknown = sorted(set(crema) - set(CREMA_OPTIONS))
    if unknown:
        raise ApiError(f"crema.{unknown[0]}: unknown option (options: {', '.join(CREMA_OPTIONS)})",
                       f"crema.{unknown[0]}", "unknown_parameter")
    if crema.get("depth") is not None:
        tensors["depth"] = media.bytes_of(crema["depth"], "crema.depth")
        sizes["crema.depth"] = len(tensors["depth"])
    if crema.get("pc") is not None:
        tensors["pc_feat"], tensors["pc_coords"] = media.points_of(crema["pc"], "crema.pc")
        sizes["crema.pc"] = tensors["pc_feat"].nbytes + tensors["pc_coords"].nbytes
    task = crema.get("task")
    if task is not None and task not in TASKS:
        raise ApiError(f"crema.task: {task!r}, expected one of {', '.join(TASKS)}", "crema.task", "invalid_value")
    prompt = _prompt_fields(crema)
    stream = _typed(request, "stream", bool, False)
    options = _typed(request, "stream_options", dict, {}) or {}
    include_usage = _typed(options, "include_usage", bool, False, "stream_options.")
    return ChatRequest(text, request_tensors(
        text, tensors["video"], tensors["depth"], tensors["audio"], tensors["pc_feat"], tensors["pc_coords"],
        task=task, num_beams=_count(crema, "num_beams", "crema."), max_new_tokens=_max_tokens(request), **prompt),
        stream, include_usage, sizes)


def _check_parameters(request: dict, model: str) -> None:
    for name in request:
        if name not in KNOWN:
            raise ApiError(f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
    for name, accepted in NO_OP.items():
        if name in request and not any(_same(request[name], a) for a in accepted):
            raise ApiError(f"{name}: {json.dumps(request[name])[:80]} is not supported by this model (it answers "
                           f"with beam search, one text answer; accepted: {' or '.join(map(json.dumps, accepted))})",
                           name, "unsupported_parameter")
    if "model" not in request:
        raise ApiError("model: required", "model", "missing_required_parameter")
    if request["model"] != model:
        raise ApiError(f"model: {json.dumps(request['model'])[:80]}, this gateway serves {model!r} only", "model",
                       "model_not_found", 404)
    if not isinstance(request.get("messages"), list) or not request["messages"]:
        raise ApiError("messages: required, a non-empty list", "messages", "missing_required_parameter")


def _same(value, accepted) -> bool:
    """JSON equality, with booleans apart from numbers (true is not 1)."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    return value == accepted


def _user_message(messages: list) -> tuple[str, list[tuple[str, str, object]]]:
    """The one user message -> (its text, [(param, part type, media value)])."""
    user = None
    for i, m in enumerate(messages):
        m = _object(m, f"messages[{i}]")
        role = m.get("role")
        if role in ROLES_IGNORED:
            continue
        if role == "assistant":
            raise ApiError(f"messages[{i}]: an assistant message; this model answers one question about one clip "
                           "and reads no conversation history (send one user message)", f"messages[{i}].role",
                           "unsupported_role")
        if role != "user":
            raise ApiError(f"messages[{i}].role: {json.dumps(role)[:40]}, expected user (or system/developer, "
                           "ignored)", f"messages[{i}].role", "invalid_role")
        if user is not None:
            raise ApiError(f"messages[{i}]: a second user message; this model answers one question (send one)",
                           f"messages[{i}]", "unsupported_conversation")
        user = i
    if user is None:
        raise ApiError("messages: no user message (the question)", "messages", "missing_user_message")
    return _content(messages[user].get("content"), f"messages[{user}].content")


def _content(content, param: str) -> tuple[str, list]:
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ApiError(f"{param}: required, a string or a non-empty list of parts", param,
                       "missing_required_parameter" if content is None else "invalid_type")
    texts, media = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        part = _object(part, where)
        kind = part.get("type")
        if kind == "text":
            texts.append(_typed(part, "text", str, None, where + ".") or "")
        elif kind == "video_url":
            url = _object(part.get("video_url"), where + ".video_url")
            media.append((where + ".video_url.url", kind, url.get("url")))
        elif kind == "input_audio":
            audio = _object(part.get("input_audio"), where + ".input_audio")
            if audio.get("format") not in AUDIO_FORMATS:
                raise ApiError(f"{where}.input_audio.format: {json.dumps(audio.get('format'))[:40]}, expected one of "
                               f"{', '.join(AUDIO_FORMATS)}", where + ".input_audio.format", "invalid_value")
            media.append((where + ".input_audio.data", kind, audio.get("data")))
        else:
            raise ApiError(f"{where}.type: {json.dumps(kind)[:40]} is not supported (text, video_url, input_audio)",
                           where + ".type", "unsupported_content_type")
    text = " ".join(" ".join(texts).split())
    if not text:
        raise ApiError(f"{param}: no text (the question)", param, "missing_question")
    return text, media


def _object(value, param: str) -> dict:
    if not isinstance(value, dict):
        raise ApiError(f"{param}: expected an object", param, "invalid_type")
    return value


def _typed(obj: dict, name: str, kind: type, default, prefix: str = ""):
    value = obj.get(name, default)
    if value is not None and type(value) is not kind:
        raise ApiError(f"{prefix}{name}: expected {kind.__name__}", prefix + name, "invalid_type")
    return value if value is not None else default


def _prompt_fields(crema: dict) -> dict:
    """A dataset's structured request (the served model builds CREMA's prompt around the question):
    options (nextqa: five strings), situation (sqa3d), templ_values (music-avqa, e.g. '["cello"]')."""
    out = {}
    options = crema.get("options")
    if options is not None:
        if not isinstance(options, list) or not 1 <= len(options) <= 5 or not all(isinstance(o, str) for o in options):
            raise ApiError("crema.options: expected a list of 1 to 5 strings", "crema.options", "invalid_value")
        out["options"] = options
    for name in ("situation", "templ_values"):
        value = crema.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ApiError(f"crema.{name}: expected a string", f"crema.{name}", "invalid_type")
            out[name] = value
    return out


def _count(obj: dict, name: str, prefix: str = "") -> int | None:
    value = obj.get(name)
    if value is not None and (type(value) is not int or not 1 <= value <= 1 << 16):
        raise ApiError(f"{prefix}{name}: expected a positive integer", prefix + name, "invalid_value")
    return value


def _max_tokens(request: dict) -> int | None:
    given = [n for n in ("max_completion_tokens", "max_tokens") if request.get(n) is not None]
    if len(given) == 2 and request[given[0]] != request[given[1]]:
        raise ApiError("max_tokens and max_completion_tokens differ: give one", "max_tokens", "invalid_value")
    return _count(request, given[0]) if given else None
