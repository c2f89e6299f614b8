"""``docs/configs.md`` is the config dataclasses rendered (``launch/config_docs.py``): current, complete, and every
flag it lists sets a field that exists."""

from __future__ import annotations

import dataclasses

from dvg_dist.config import Config
from dvg_dist.runtime.cli import FLAG_FIELDS
from dvg_dist.runtime.config_docs import PAGE, SECTIONS, main, render, undocumented


def test_config_page_is_current_and_every_field_is_documented(capsys):
    assert [name for name, _ in SECTIONS] == [f.name for f in dataclasses.fields(Config)]
    assert undocumented() == [], "every config field needs a docstring: the page shows it as the field's meaning"
    assert PAGE.read_text() == render(), "docs/configs.md is stale: run python launch/config_docs.py --write"
    assert main(["--check"]) == 0 and "is current" in capsys.readouterr().out
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS for f in dataclasses.fields(cls)}
    assert set(FLAG_FIELDS.values()) <= fields, set(FLAG_FIELDS.values()) - fields
    text = render()
    for key in ("`loras`", "`budget_counting`", "`meanflow_switch_end`", "`--lora_2`", "`--sample_steps`"):
        assert key in text, key
