"""``sd35trt inspect``'s detail lines: long record details are split, never cut inside a JSON value."""

import json

from sd35trt.info import DETAIL_LINE_CHARS, DETAIL_LIST_ITEMS, detail_lines


def _value(line: str) -> str:
    return line.split(": ", 1)[1]


def test_long_details_are_split_by_keys_and_items_and_every_value_is_whole_json():
    amax = {f"transformer_blocks.{i}.attn.to_q.input_quantizer": 0.125 * i for i in range(30)}
    prompt = "a watercolor painting of a lighthouse on a cliff at dawn, " * 5  # one long string
    details = {"amax": amax, "prompts": [prompt, "a cat"], "steps": 4, "seeds": list(range(100))}
    lines = [line for key, value in details.items() for line in detail_lines(key, value, "  ")]
    for line in lines:
        if line.strip().startswith("... and"):
            continue
        text = _value(line)
        if not text.startswith("("):
            json.loads(text)  # a whole JSON value: nothing cut mid-string
    assert "  steps: 4" in lines and "  amax: (30 keys)" in lines
    assert f"    [0]: {json.dumps(prompt)}" in lines  # a long string is printed whole
    assert len(json.dumps(prompt)) > DETAIL_LINE_CHARS
    assert f"    ... and {100 - DETAIL_LIST_ITEMS} more items" in lines
    assert detail_lines("short", {"a": [1, 2]}, "") == ['short: {"a": [1, 2]}']
