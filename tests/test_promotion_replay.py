"""The promotion replay benchmark on a committed study: it reproduces what the search did, and what the rule saves."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

STUDY = ROOT / "benchmarks" / "equal_compute" / "studies" / "resnet18_cifar-0.25x-b.db"


@pytest.mark.skipif(not STUDY.is_file(), reason="the committed ResNet-18 equal-compute study is absent")
def test_replaying_a_search_gives_its_own_promotions_and_the_eager_share_promotes_the_final_third() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from promotion_replay import replay_study

    found = replay_study(STUDY)
    rules = found["rules"]
    # Plain asynchronous ASHA, replayed in the order the trials finished, promotes what the search promoted.
    assert rules["plain ASHA"]["promotions"] == found["promoted_in_the_study"] == 12
    # The eager share promotes the top third of the 26 at the end (8), saving about 400 s of rung-1 fine-tunes,
    # and its pick is tied with the search's own on the same images.
    eager = rules["eager share 1/2"]
    assert eager["promotions"] == 8 and eager["promoted"] == rules["at the end only"]["promoted"]
    assert found["search_seconds"] - eager["search_seconds"] > 350
    assert eager["same_pick"] or eager["tied_with_the_studys_pick"]
