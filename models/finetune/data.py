"""OpenAI fine-tuning JSONL -> conversations in chat-template form, with their images.

One `{"messages": [...]}` per line; user content is a string or a list of `text` and
`image_url` parts (a `data:` URL, or a file path relative to the JSONL file). Every
problem is collected with its line number, so a bad file is reported whole before any
training starts. Messages become what the server's chat route hands the chat template:
text-only content a string joined by newlines, each image part `{"type": "image"}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

ROLES = ("system", "user", "assistant")
Message = dict[str, Any]


class DataError(ValueError):
    """The data cannot be trained on; `problems` holds one 'FILE:LINE: what' per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class LineError(ValueError):
    """One problem of the line being read."""


@dataclass
class Conversation:
    source: str  # "train.jsonl:12", for messages about this line
    messages: list[Message]  # chat-template messages
    images: list[Image.Image] = field(default_factory=list)  # RGB, in prompt order
    trained_turns: list[int] = field(default_factory=list)  # assistant message indices


def read_conversations(path: Path) -> tuple[list[Conversation], list[str]]:
    """Every conversation that parses, and a problem line for each one that does not."""
    if not path.is_file():
        return [], [f"{path}: no such file"]
    conversations: list[Conversation] = []
    problems: list[str] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{path.name}:{number}"
        try:
            conversations.append(parse_line(line, source, path.parent))
        except LineError as error:
            problems.append(f"{source}: {error}")
    if not conversations and not problems:
        problems.append(f"{path}: no examples")
    return conversations, problems


def parse_line(line: str, source: str, base_dir: Path) -> Conversation:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise LineError(f"not JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise LineError('expected an object {"messages": [...]}')
    conversation = Conversation(source, [])
    for index, message in enumerate(record["messages"]):
        conversation.messages.append(_message(message, index, conversation, base_dir))
    if not conversation.trained_turns:
        raise LineError("no assistant turn to train on")
    return conversation


def _message(message: Any, index: int, conversation: Conversation, base_dir: Path) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise LineError(f"{where} needs a role among {', '.join(ROLES)}")
    role = message["role"]
    content = _content(message.get("content"), where, conversation, base_dir)
    if role == "assistant":
        if not isinstance(content, str):
            raise LineError(f"{where}: an assistant turn holds text only")
        if message.get("weight", 1) not in (0, 1):
            raise LineError(f"{where}: weight must be 0 or 1")
        if message.get("weight", 1) == 1:
            conversation.trained_turns.append(index)
    return {"role": role, "content": content}


def _content(
    content: Any, where: str, conversation: Conversation, base_dir: Path
) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise LineError(f"{where}: content must be a string or a list of parts")
    parts = [_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    for part in parts:
        if part["type"] == "image":
            conversation.images.append(load_image(part.pop("url"), base_dir))
    return parts


def _part(part: Any, where: str) -> dict[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and url:
            return {"type": "image", "url": url}
    raise LineError(f"{where} must be a text part or an image_url part with a url")


def load_image(url: str, base_dir: Path) -> Image.Image:
    """A data URL or a file path (relative to the JSONL file) -> upright RGB pixels."""
    if url.startswith(("http://", "https://")):
        raise LineError(f"cannot fetch {url}: use a data: URL or a file path")
    if url.startswith("data:"):
        return decode_image(_data_url_bytes(url), "the data URL")
    path = base_dir / url.removeprefix("file://")
    if not path.is_file():
        raise LineError(f"image not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise LineError("image data URLs must look like data:image/png;base64,...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise LineError("the image data URL is not valid base64") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decoded as the server decodes: first frame, EXIF orientation, alpha over white."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise LineError(f"cannot decode {name}: not an image format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise LineError(f"cannot decode {name} as an image ({error})") from None
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright if upright.mode == "RGB" else upright.convert("RGB")
