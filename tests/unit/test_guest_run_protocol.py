"""kvmlet.run=: the command parameter and the exit marker read from the console."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlet.guest.run_protocol import (
    command_output,
    command_started,
    parse_exit_status,
    run_parameter,
)


def test_parameter_carries_the_command_without_spaces():
    parameter = run_parameter("echo 'a b' && exit 3")
    name, _, value = parameter.partition("=")
    assert name == "kvmlet.run" and " " not in parameter
    assert base64.b64decode(value) == b"echo 'a b' && exit 3"


def test_overlong_command_is_refused():
    with pytest.raises(ValueError, match="too long"):
        run_parameter("x" * 2000)


def test_the_command_started_once_the_ready_marker_is_a_whole_line():
    assert command_started(b"[ 1.0] boot\r\nkvmlet-guest: ready\r\nhi\r\n")
    assert command_started(b"kvmlet-guest: ready\n")
    assert not command_started(b"Kernel panic - not syncing: Attempted to kill init!\r\n")
    assert not command_started(b"kvmlet-guest: ready")  # the line is not complete yet


def test_last_well_formed_marker_wins():
    console = b"boot\r\nkvmlet-exit: 1\nmore\r\nkvmlet-exit: 42\r\n"
    assert parse_exit_status(console) == 42
    assert parse_exit_status(b"kvmlet-exit: 5") is None  # line not complete yet
    assert parse_exit_status(b"kvmlet-exit: 999\n") is None
    assert parse_exit_status(b"no marker\n") is None


@given(st.binary(max_size=300))
def test_any_console_bytes_parse_without_error(console):
    status = parse_exit_status(console)
    assert status is None or 0 <= status <= 255


def test_command_output_is_what_lies_between_the_markers():
    console = b"[ 1.0] boot\r\nkvmlet-guest: ready\r\nline one\r\nline two\r\nkvmlet-exit: 3\r\n"
    assert command_output(console) == "line one\nline two\n"
    assert command_output(b"[ 1.0] boot, no init yet\r\n") == ""
    assert command_output(b"kvmlet-guest: ready\r\npartial") == "partial"
