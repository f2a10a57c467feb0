#!/usr/bin/env python3
"""Regenerates reference.json: (epsilon, delta) values from Google's
dp-accounting 0.6.0 that tests/reference_values.rs checks fedsb-privacy against.

    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpvenv/bin/python shared/privacy/tests/reference/gen_reference.py

pld_optimistic_epsilon is dp-accounting's optimistic PLD (rounding losses
down), a lower bound on the true epsilon up to its tail truncation.

All cases are the Poisson-subsampled Gaussian mechanism under the add/remove
neighbouring relation. RDP uses the fedsb default orders
{1.1, ..., 10.9} U {12, ..., 63}; PLD uses dp-accounting's defaults
(value_discretization_interval 1e-4, pessimistic connect-the-dots).
"""

import json
import math
import os

import dp_accounting as dpa
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def event(segments):
    return dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        for q, sigma, steps in segments
    ])


def accountants(segments):
    rdp = rdp_privacy_accountant.RdpAccountant(ORDERS)
    rdp.compose(event(segments))
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event(segments))
    return rdp, pld


def optimistic_pld_epsilon(segments, delta):
    """A lower bound on the true epsilon: dp-accounting's optimistic PLD."""
    pld = None
    for q, sigma, steps in segments:
        one = privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=sigma,
            pessimistic_estimate=False,
            use_connect_dots=False,
            sampling_prob=q,
        ).self_compose(steps)
        pld = one if pld is None else pld.compose(one)
    return pld.get_epsilon_for_delta(delta)


def seg_json(segments):
    return [{"sample_rate": q, "noise_multiplier": s, "steps": n}
            for q, s, n in segments]


def main():
    epsilon_cases = [
        # The table of the fedsb brief.
        ([(0.04, 1.5, 2250)], 1e-5),
        ([(0.01, 1.1, 10000)], 1e-5),
        ([(0.01, 4.0, 1000)], 1e-5),
        ([(0.001, 1.0, 10000)], 1e-6),
        # A spread of regimes.
        ([(0.001, 0.8, 1000)], 1e-5),
        ([(0.005, 0.7, 3000)], 1e-5),
        ([(0.02, 2.0, 500)], 1e-5),
        ([(0.05, 1.0, 1)], 1e-5),
        ([(0.05, 1.0, 100)], 1e-5),
        ([(0.1, 3.0, 2000)], 1e-6),
        ([(0.2, 5.0, 300)], 1e-5),
        ([(1.0, 10.0, 10)], 1e-5),
        ([(1.0, 2.0, 1)], 1e-5),
        ([(0.3, 0.9, 50)], 1e-3),
        # Heterogeneous compositions (a client whose q or sigma changed).
        ([(0.01, 1.1, 2000), (0.02, 1.5, 1000)], 1e-5),
        ([(0.04, 1.5, 1000), (0.04, 2.0, 1250), (0.01, 0.9, 300)], 1e-5),
    ]
    out_eps = []
    for segments, delta in epsilon_cases:
        rdp, pld = accountants(segments)
        out_eps.append({
            "segments": seg_json(segments),
            "delta": delta,
            "rdp_epsilon": rdp.get_epsilon(delta),
            "pld_epsilon": pld.get_epsilon(delta),
            "pld_optimistic_epsilon": optimistic_pld_epsilon(segments, delta),
        })

    delta_cases = [
        ([(0.04, 1.5, 2250)], 5.0),
        ([(0.01, 1.1, 10000)], 3.0),
        ([(0.02, 2.0, 500)], 0.5),
    ]
    out_delta = []
    for segments, epsilon in delta_cases:
        rdp, pld = accountants(segments)
        out_delta.append({
            "segments": seg_json(segments),
            "epsilon": epsilon,
            "rdp_delta": rdp.get_delta(epsilon),
            "pld_delta": pld.get_delta(epsilon),
        })

    curves = []
    for q, sigma in [(0.01, 1.1), (0.04, 1.5), (0.3, 0.6), (0.001, 5.0)]:
        rdp = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
            q, sigma, ORDERS)
        curves.append({
            "sample_rate": q,
            "noise_multiplier": sigma,
            "orders": ORDERS,
            "rdp": [r if math.isfinite(r) else None for r in rdp],
        })

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "reference.json"), "w") as f:
        json.dump({
            "generator": "dp-accounting 0.6.0 via gen_reference.py",
            "epsilon": out_eps,
            "delta": out_delta,
            "rdp_curves": curves,
        }, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
