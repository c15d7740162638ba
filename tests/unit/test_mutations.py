"""The mutation check's own data: every mutation's text is still in its file, once, so a
refactor that moves the code fails here, in the plain test run, and not only in CI's
mutation step."""

from pathlib import Path

from tests.mutations.run import Edit, Mutation, load, problems

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutation_still_applies_to_the_code() -> None:
    mutations = load()
    assert len(mutations) >= 15
    assert problems(mutations, ROOT) == []


def test_a_mutation_whose_text_moved_is_reported() -> None:
    gone = Mutation(
        "gone",
        "nothing",
        "worker/consumer.py",
        (Edit("no such text", "x"),),
        ("tests/unit/test_ack_window.py",),
    )
    [problem] = problems([gone], ROOT)
    assert problem.startswith("gone: edit 1's old text occurs 0 times in worker/consumer.py")
