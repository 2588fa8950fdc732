"""The demo page in a real browser (Debian's Chromium, driven by playwright-core): ask, drop
the connection, reload mid-answer, a second tab, stop; the text is the exact answer each time."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from bench.native import node_script
from shared.settings import Settings
from tests.support import start_stack
from worker.backends.mock import mock_text

NODE_SOURCES = Path(__file__).parents[1] / "node"
PROMPT = "Tell me how a resumable token stream works."


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found is not None:
            return found
    if os.environ.get("CI"):
        pytest.fail("the demo page test needs Chromium (Debian package chromium)")
    pytest.skip("Chromium is not installed (Debian package chromium)")


@pytest.mark.usefixtures("redis")
@pytest.mark.timeout(180)
async def test_the_demo_page_survives_drops_reloads_tabs_and_stops(settings: Settings) -> None:
    chromium = _chromium()
    script = node_script("demo_page.mjs", NODE_SOURCES)
    paced = dataclasses.replace(settings, mock_token_delay_ms=25)
    async with start_stack(paced) as stack:
        process = await asyncio.create_subprocess_exec(
            str(script.parent / "node_modules" / ".bin" / "node"),
            str(script),
            stack.url,
            chromium,
            PROMPT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 150)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out)
    assert seen["dropped"] == {"state": "done", "text": mock_text(PROMPT, 120)}
    assert seen["reloaded"] == {"state": "done", "text": mock_text(PROMPT, 150)}
    assert (
        seen["first_tab"] == seen["second_tab"] == {"state": "done", "text": mock_text(PROMPT, 150)}
    )
    stopped = seen["stopped"]
    assert stopped["state"] == seen["stopped_second_tab"]["state"] == "cancelled"
    assert mock_text(PROMPT, 1000).startswith(stopped["text"])
    assert len(stopped["text"]) < len(mock_text(PROMPT, 1000))
    # Ask waits while an answer streams (a double click would start two), and comes back.
    assert (seen["ask_while_streaming"], seen["ask_after_stopping"]) == (False, True)
