"""The pool's messages decoded as untrusted data (warm_pool/protocol.py): what is refused,
and the template's settings, which cross as a typed message like every other."""

from __future__ import annotations

import json

import pytest

from warm_pool import protocol

SETTINGS = protocol.TemplateSettings(
    backend="cpu", backend_preload=None, preload=("matplotlib",), matplotlib_dir="/var/lib/x/mpl",
    job_paths=("/opt/helpers",), needed=("/usr/lib/python3.11",), reuse_workers=False,
    uid_base=200_000, groups=(44, 991), writable=("/var/lib/x/jobs",), max_file_bytes=1 << 30)


def _edit(msg: protocol.Message, **fields) -> bytes:
    body = json.loads(msg.encode())
    body.update(fields)
    return json.dumps(body).encode()


def test_the_templates_settings_cross_whole_and_typed():
    again = protocol.decode(SETTINGS.encode(), (protocol.TemplateSettings,))
    assert again == SETTINGS and again.groups == (44, 991) and again.skip == {}


@pytest.mark.parametrize(("fields", "says"), [
    ({"groups": ["44"]}, "template_settings.groups has the wrong type"),
    ({"needed": [1]}, "template_settings.needed has the wrong type"),
    ({"uid_base": "0"}, "template_settings.uid_base has the wrong type"),
    ({"reuse_workers": 1}, "template_settings.reuse_workers has the wrong type"),
    ({"v": 2}, "protocol version must be 1"),
    ({"type": "spawn"}, "unexpected message type 'spawn'"),
    ({"extra": True}, "wrong fields (unexpected ['extra']"),
])
def test_a_message_of_the_wrong_shape_is_refused(fields, says):
    with pytest.raises(protocol.ProtocolError, match=says.replace("(", r"\(").replace("[", r"\[")):
        protocol.decode(_edit(SETTINGS, **fields), (protocol.TemplateSettings,))


def test_a_frame_over_the_limit_is_refused_before_it_is_parsed():
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode(b" " * (protocol.MAX_FRAME + 1), (protocol.TemplateSettings,))


def test_an_error_is_kept_as_its_type_and_first_line_cut_to_its_limit():
    assert protocol.error_text(ValueError("bad value\nTraceback (most recent call last): ...")) == \
        "ValueError: bad value"
    assert protocol.error_text(KeyError()) == "KeyError"
    long = protocol.error_text(OSError("x" * 1000), limit=50)
    assert long == "OSError: " + "x" * 41 + "..." and len(long) == 53
