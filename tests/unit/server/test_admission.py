"""Upload admission with a fake clock and a fake budget: slots in arrival order, head-of-line budget waits,
expiry, release on leave, repeated requests."""

from __future__ import annotations

from fedquic.server.admission import Expired, Granted, UploadAdmission


class FakeBudget:
    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def try_reserve(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def unreserve(self, n: int) -> None:
        self.held -= n


def keys(events: list) -> list:  # type: ignore[type-arg]
    return [e.key for e in events]


def test_slots_are_granted_in_arrival_order() -> None:
    adm = UploadAdmission(slots=2, timeout_s=30, budget=FakeBudget(10**9))
    assert keys(adm.request("a", 10, now=0.0)) == ["a"]
    assert keys(adm.request("b", 10, now=1.0)) == ["b"]
    assert adm.request("c", 10, now=2.0) == [] and adm.request("d", 10, now=2.5) == []
    assert (adm.waiting, adm.in_flight) == (2, 2)  # c and d wait for a slot
    [g] = adm.release("b", now=3.0)
    assert g == Granted("c", 10, 33.0)  # c before d, its slot timed from its own grant
    assert keys(adm.release("a", now=4.0)) == ["d"]
    assert adm.in_flight_max == 2


def test_a_repeated_request_is_one_place_in_line() -> None:
    adm = UploadAdmission(slots=1, timeout_s=30, budget=FakeBudget(10**9))
    assert keys(adm.request("a", 10, now=0.0)) == ["a"]
    assert adm.request("a", 10, now=1.0) == []  # already granted
    assert adm.request("b", 10, now=1.0) == [] and adm.request("b", 10, now=2.0) == []
    assert adm.waiting == 1


def test_a_slot_holder_waits_for_budget_and_others_with_slots_go_ahead() -> None:
    budget = FakeBudget(100)
    adm = UploadAdmission(slots=3, timeout_s=30, budget=budget)
    assert keys(adm.request("a", 60, now=0.0)) == ["a"]
    assert adm.request("big", 60, now=1.0) == []  # a slot, but no room: it keeps its slot
    assert keys(adm.request("small", 10, now=2.0)) == ["small"]  # a slot of its own, and its bytes fit
    assert adm.request("late", 10, now=2.5) == []  # no slot left: it waits for one, in order
    assert adm.waiting_for_budget and adm.waiting == 1 and budget.held == 70
    assert adm.admit(now=3.0) == []  # still no room for big
    budget.unreserve(60)  # a's update arrived and was handled: the transport gave its room back
    assert keys(adm.release("a", now=4.0)) == ["big", "late"]
    assert budget.held == 80 and not adm.waiting_for_budget


def test_an_unused_grant_expires_and_frees_its_slot() -> None:
    adm = UploadAdmission(slots=1, timeout_s=30, budget=FakeBudget(10**9))
    adm.request("a", 10, now=0.0)
    adm.request("b", 10, now=1.0)
    assert adm.next_deadline() == 30.0
    assert adm.poll(now=29.9) == []
    assert adm.poll(now=30.0) == [Expired("a")]  # the daemon revokes a's permit, then admits
    assert adm.admit(now=30.0) == [Granted("b", 10, 60.0)]
    assert not adm.holds("a") and adm.holds("b")


def test_a_client_that_leaves_gives_up_its_place() -> None:
    adm = UploadAdmission(slots=1, timeout_s=30, budget=FakeBudget(10**9))
    adm.request("a", 10, now=0.0)
    adm.request("gone", 10, now=1.0)
    adm.request("c", 10, now=2.0)
    assert adm.release("gone", now=3.0) == []  # left while queued: nothing granted yet, c keeps waiting
    assert keys(adm.release("a", now=4.0)) == ["c"]
    assert adm.release("never-asked", now=5.0) == []
