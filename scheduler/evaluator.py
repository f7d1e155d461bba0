"""Parent scoring: Dragonfly's load-aware evaluator (v2.4 and later) and its bad-parent test."""

from __future__ import annotations

import statistics

from scheduler.resources import PIECE_COST_WINDOW, RECEIVED, Host, Peer, PeerState

LOAD_WEIGHT, IDC_WEIGHT, LOCATION_WEIGHT, HOST_TYPE_WEIGHT = 0.6, 0.2, 0.1, 0.1
PEAK_WEIGHT, DURATION_WEIGHT, CONCURRENCY_WEIGHT = 0.5, 0.3, 0.2
DURATION_WINDOW = 60.0  # seconds of upload the bandwidth-duration score looks ahead
CONCURRENCY_PIECE_BITS = (16 << 20) * 8
MAX_LOCATION_ELEMENTS = 5
MIN_COSTS = 2
BAD_COST_FACTOR = 20
_BAD_STATES = RECEIVED | {PeerState.FAILED, PeerState.LEAVE, PeerState.PENDING}
_SEED_GOOD_STATES = frozenset({PeerState.RECEIVED_NORMAL, PeerState.RUNNING})


def peak_bandwidth(host: Host) -> float:
    """``max(0, 1 - tx/max_tx)``; 0 when the host announced no capacity."""
    if host.max_tx_bandwidth <= 0:
        return 0.0
    return max(0.0, 1.0 - host.tx_bandwidth / host.max_tx_bandwidth)


def bandwidth_duration(host: Host) -> float:
    """``1 - upload_content_length*8 / max_tx / 60 s``, floored at 0; 0 when no capacity."""
    if host.max_tx_bandwidth <= 0:
        return 0.0
    return max(0.0, 1.0 - host.upload_content_length * 8 / host.max_tx_bandwidth / DURATION_WINDOW)


def concurrency(host: Host) -> float:
    """How far the concurrent uploads stay under ``max_tx / (16 MiB * 8)``."""
    needed = host.max_tx_bandwidth / CONCURRENCY_PIECE_BITS
    if needed <= 1:
        return 0.0
    if host.concurrent_upload_piece_count <= needed:
        return 1.0
    return needed / host.concurrent_upload_piece_count


def load_quality(host: Host) -> float:
    """``0.5 peak + 0.3 duration + 0.2 concurrency``."""
    return (PEAK_WEIGHT * peak_bandwidth(host) + DURATION_WEIGHT * bandwidth_duration(host)
            + CONCURRENCY_WEIGHT * concurrency(host))


def idc_affinity(parent: str, child: str) -> float:
    """1 when both IDCs are set and equal ignoring case, else 0."""
    return 1.0 if parent and child and parent.casefold() == child.casefold() else 0.0


def location_affinity(parent: str, child: str) -> float:
    """Matching leading ``|``-separated elements (at most 5) over 5; 1 on an exact match."""
    if not parent or not child:
        return 0.0
    if parent.casefold() == child.casefold():
        return 1.0
    matched = 0
    for a, b in zip(parent.split("|")[:MAX_LOCATION_ELEMENTS], child.split("|")[:MAX_LOCATION_ELEMENTS],
                    strict=False):
        if a.casefold() != b.casefold():
            break
        matched += 1
    return matched / MAX_LOCATION_ELEMENTS


def host_type_score(parent: Peer) -> float:
    """1 for a seed in ReceivedNormal or Running, 0 for other seeds, 0.5 for normal peers."""
    if not parent.host.is_seed:
        return 0.5
    return 1.0 if parent.state in _SEED_GOOD_STATES else 0.0


def evaluate(parent: Peer, child: Peer) -> float:
    """``0.6 load + 0.2 IDC + 0.1 location + 0.1 host type`` of *parent* for *child*."""
    return (LOAD_WEIGHT * load_quality(parent.host)
            + IDC_WEIGHT * idc_affinity(parent.host.idc, child.host.idc)
            + LOCATION_WEIGHT * location_affinity(parent.host.location, child.host.location)
            + HOST_TYPE_WEIGHT * host_type_score(parent))


def is_bad_parent(peer: Peer) -> bool:
    """Bad when not downloading or done, or when its newest piece cost is an outlier of its cost window.

    While the 20-cost window fills, the newest cost must exceed 20 times the mean of the earlier ones; once it is
    full, their mean plus 3 population standard deviations.
    """
    if peer.state in _BAD_STATES:
        return True
    costs = list(peer.piece_costs)
    if len(costs) < MIN_COSTS:
        return False
    *earlier, last = costs
    mean = statistics.fmean(earlier)
    if len(costs) < PIECE_COST_WINDOW:
        return last > mean * BAD_COST_FACTOR
    return last > mean + 3 * statistics.pstdev(earlier)
