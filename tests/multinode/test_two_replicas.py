"""Two replicas, each a gang packed on a machine of its own, served by `serve run` of a YAML
config. One gang's machine dies under steady traffic: the survivor keeps answering (right
tokens), Serve replaces the lost gang on the machine left, and only requests the dead gang held
fail. A module of its own: it needs three machines with nothing else on them."""
from __future__ import annotations


def test_with_two_replicas_the_survivor_answers_while_the_lost_gang_is_replaced(nodes, tmp_path):
    got = nodes.run_killing_a_node("two_replicas.py", tmp_path)
    after_kill = [o for o in got["outcomes"] if o["sent"] is not None and o["sent"] >= 0]
    failed = [o for o in got["outcomes"] if o["outcome"] != "right"]
    print(f"\ntwo replicas, machine {got['victim']} killed: {len(after_kill)} requests sent after the kill, "
          f"{len(failed)} failed: {failed}; replicas before {got['replicas_before']}, after {got['replicas_after']} "
          f"(both answering {got['replaced_s']} s after the kill; serve run stopped in {got['shutdown_s']} s)")
    assert all(o["outcome"] != "WRONG" for o in got["outcomes"])
    assert len(after_kill) >= 20  # the survivor kept answering
    # Only requests the dead gang held fail: each was sent before the first failure came back
    # (Serve marks a replica dead then, and sends nothing more to it), and failed as a 5xx.
    if failed:
        known = min(o["ended"] for o in failed)
        assert all(o["sent"] is not None and o["sent"] < known for o in failed), failed
        assert all(o["outcome"] in (500, 502, 503, "transport") for o in failed), failed
    # Serve replaced the lost gang on the machine that was free.
    assert got["victim"] not in got["replicas_after"] and len(got["replicas_after"]) == 2
