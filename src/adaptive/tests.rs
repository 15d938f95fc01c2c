//! Deterministic convergence tests: a simulated upstream whose latency rises
//! once concurrency passes its capacity (`workers` busy, the rest queue), kept
//! fully loaded (there are always more requests than the limit admits).

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::jitter::Jitter;

const SERVICE: Duration = Duration::from_millis(20);

/// Runs `algorithm` against an upstream of `workers(t)` workers for `length`;
/// `demand` caps the requests available (None: always more than the limit).
/// Returns the limit after each round of requests, with the time.
fn drive(
    algorithm: &mut dyn LimitAlgorithm,
    start: Instant,
    length: Duration,
    workers: impl Fn(Duration) -> usize,
    demand: Option<usize>,
) -> Vec<(Duration, usize)> {
    let mut now = start;
    let mut trace = Vec::new();
    while now - start < length {
        let limit = algorithm.limit();
        let inflight = demand.map_or(limit, |d| d.min(limit)).max(1);
        let limited = demand.is_none_or(|d| d >= limit);
        let w = workers(now - start);
        let rtt = SERVICE.mul_f64((inflight as f64 / w as f64).max(1.0));
        let step = rtt / inflight as u32;
        for _ in 0..inflight {
            now += step;
            let sample = Sample {
                rtt,
                inflight,
                dropped: false,
                limited,
                client: None,
            };
            algorithm.sample(sample, now);
        }
        trace.push((now - start, algorithm.limit()));
    }
    trace
}

fn gradient(initial: usize) -> Gradient {
    let bounds = Bounds {
        min: 1,
        max: 1000,
        initial,
    };
    Gradient::new(bounds, GradientSettings::default(), Instant::now())
}

/// The limit over the last `tail` of the trace, min and max.
fn settled(trace: &[(Duration, usize)], after: Duration) -> (usize, usize) {
    let tail = trace.iter().filter(|(t, _)| *t >= after).map(|(_, l)| *l);
    let (min, max) = tail.fold((usize::MAX, 0), |(a, b), l| (a.min(l), b.max(l)));
    (min, max)
}

#[test]
fn gradient_converges_near_capacity_from_below_and_above() {
    for initial in [1, 200] {
        let mut g = gradient(initial);
        let trace = drive(
            &mut g,
            Instant::now(),
            Duration::from_secs(40),
            |_| 16,
            None,
        );
        // Settled: at least the 16 workers busy, and an upstream queue of no
        // more than about the square-root allowance (latency ≤ ~1.5× no-load).
        let (min, max) = settled(&trace, Duration::from_secs(20));
        eprintln!("from {initial}: settled in {min}..={max}");
        assert!(
            min >= 16 && max <= 26,
            "from {initial}: settled in {min}..={max}"
        );
        let snap = g.snapshot(Instant::now());
        assert!(
            (19.0..=21.0).contains(&snap.baseline_ms.unwrap()),
            "{snap:?}"
        );
    }
}

#[test]
fn gradient_follows_a_drop_and_a_rise_of_capacity_within_a_few_windows() {
    let mut g = gradient(10);
    // 16 workers, then 8 from 30 s, then 16 again from 60 s.
    let workers = |t: Duration| {
        if t >= Duration::from_secs(30) && t < Duration::from_secs(60) {
            8
        } else {
            16
        }
    };
    let trace = drive(
        &mut g,
        Instant::now(),
        Duration::from_secs(90),
        workers,
        None,
    );
    let window = GradientSettings::default().window;
    let first_at = |from: Duration, ok: &dyn Fn(usize) -> bool| {
        trace
            .iter()
            .find(|(t, l)| *t >= from && ok(*l))
            .map(|(t, _)| *t - from)
    };
    let fell = first_at(Duration::from_secs(30), &|l| l <= 13).expect("never followed the drop");
    assert!(fell <= window * 16, "took {fell:?} to follow the drop");
    eprintln!("drop followed in {fell:?}");
    let during: Vec<usize> = trace
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(45) && *t < Duration::from_secs(60))
        .map(|(_, l)| *l)
        .collect();
    assert!(
        during.iter().all(|&l| (8..=14).contains(&l) || l == 1),
        "at 8 workers: {during:?}"
    );
    let rose = first_at(Duration::from_secs(60), &|l| l >= 16).expect("never followed the rise");
    eprintln!("rise followed in {rose:?}");
    assert!(rose <= window * 40, "took {rose:?} to follow the rise");
}

#[test]
fn gradient_remeasures_a_baseline_that_went_stale() {
    let mut g = gradient(16);
    let start = Instant::now();
    drive(&mut g, start, Duration::from_secs(10), |_| 16, None);
    assert!((19.0..=21.0).contains(&g.snapshot(Instant::now()).baseline_ms.unwrap()));
    // The upstream becomes twice as slow per request at the same capacity:
    // no-load latency 40 ms. Without a new baseline the limit would halve.
    let mut now = start + Duration::from_secs(10);
    let mut slow_trace = Vec::new();
    while now - start < Duration::from_secs(150) {
        let limit = g.limit();
        let rtt = (SERVICE * 2).mul_f64((limit as f64 / 16.0).max(1.0));
        for _ in 0..limit {
            now += rtt / limit as u32;
            g.sample(
                Sample {
                    rtt,
                    inflight: limit,
                    dropped: false,
                    limited: true,
                    client: None,
                },
                now,
            );
        }
        slow_trace.push((now - start, g.limit()));
    }
    let baseline = g.snapshot(Instant::now()).baseline_ms.unwrap();
    assert!((39.0..=41.0).contains(&baseline), "baseline {baseline}");
    let (min, max) = settled(&slow_trace, Duration::from_secs(130));
    eprintln!("after re-measuring: {min}..={max}, baseline {baseline}");
    assert!(
        min >= 14 || min == 1,
        "limit {min} after the re-measurement"
    );
}

#[test]
fn demand_below_half_the_limit_does_not_grow_it() {
    let mut g = gradient(40);
    let trace = drive(
        &mut g,
        Instant::now(),
        Duration::from_secs(20),
        |_| 64,
        Some(5),
    );
    let (_, max) = settled(&trace, Duration::from_secs(1));
    assert!(max <= 40, "grew to {max} with 5 requests of demand");
}

#[test]
fn aimd_backs_off_on_overload_signals_and_creeps_up_without() {
    let bounds = Bounds {
        min: 2,
        max: 100,
        initial: 20,
    };
    let mut a = Aimd::new(bounds, AimdSettings::default(), Instant::now());
    let mut now = Instant::now();
    let mut feed = |a: &mut Aimd, dropped: bool, rtt: Duration| {
        for _ in 0..20 {
            now += Duration::from_millis(15);
            let inflight = a.limit();
            a.sample(
                Sample {
                    rtt,
                    inflight,
                    dropped,
                    limited: true,
                    client: None,
                },
                now,
            );
        }
    };
    feed(&mut a, false, Duration::from_millis(20));
    assert_eq!(a.limit(), 21);
    feed(&mut a, true, Duration::from_millis(20));
    assert_eq!(a.limit(), 19); // 21 × 0.9
    feed(&mut a, false, Duration::from_secs(2)); // slower than latency_threshold
    assert_eq!(a.limit(), 17);
    for _ in 0..100 {
        feed(&mut a, true, Duration::from_millis(20));
    }
    assert_eq!(a.limit(), 2, "never below min_limit");
}

#[test]
fn one_clients_overload_signals_do_not_move_everyones_limit() {
    let bounds = Bounds {
        min: 2,
        max: 100,
        initial: 20,
    };
    let mut a = Aimd::new(bounds, AimdSettings::default(), Instant::now());
    let mut now = Instant::now();
    // Per window: 20 samples from clients 1..=4 in turn; `dropping` of them
    // time out (their own heavy requests), the rest are answered.
    let mut feed = |a: &mut Aimd, dropping: &[u8]| {
        for i in 0..20u8 {
            now += Duration::from_millis(15);
            let client = 1 + i % 4;
            let inflight = a.limit();
            let sample = Sample {
                rtt: Duration::from_millis(20),
                inflight,
                dropped: dropping.contains(&client),
                limited: true,
                client: Some(std::net::IpAddr::from([10, 0, 0, client])),
            };
            a.sample(sample, now);
        }
    };
    feed(&mut a, &[]);
    assert_eq!(a.limit(), 21);
    // One client's (or two clients') timeouts among four: no back-off.
    feed(&mut a, &[1]);
    feed(&mut a, &[1, 2]);
    assert_eq!(a.limit(), 23);
    // Three of them: the upstream is overloaded for everyone.
    feed(&mut a, &[1, 2, 3]);
    assert_eq!(a.limit(), 21); // 23 × 0.9, rounded
}

#[test]
fn a_calm_load_keeps_the_baseline_fresh_without_a_probe() {
    let start = Instant::now();
    let mut g = gradient(10);
    // Demand of 8 requests against 16 workers for five minutes: the limit
    // never binds, the upstream answers at its no-load latency.
    let trace = drive(&mut g, start, Duration::from_secs(300), |_| 16, Some(8));
    let (min, _) = settled(&trace, Duration::ZERO);
    assert!(min >= 8, "the limit fell to {min}, below the demand");
    let end = start + trace.last().unwrap().0;
    let snap = g.snapshot(end);
    assert_ne!(snap.phase, Some(Phase::Probing));
    assert_ne!(
        snap.baseline_source,
        Some(BaselineSource::Probe),
        "{snap:?}"
    );
    assert!(snap.baseline_confirmed_s_ago.unwrap() < 1.0, "{snap:?}");
    assert!(snap.baseline_stale_in_s.unwrap() > 40.0, "{snap:?}");
}

#[test]
fn a_stale_baseline_waits_for_the_limit_to_bind_before_a_probe() {
    let start = Instant::now();
    let settings = GradientSettings::default();
    let bounds = Bounds {
        min: 1,
        max: 1000,
        initial: 16,
    };
    let mut g = Gradient::with_jitter(bounds, settings, start, Jitter::seeded(3));
    let mut now = start;
    let mut feed = |g: &mut Gradient, rtt_ms: u64, limited: bool, seconds: u64| {
        let until = now + Duration::from_secs(seconds);
        while now < until {
            now += Duration::from_millis(5);
            let sample = Sample {
                rtt: Duration::from_millis(rtt_ms),
                inflight: g.limit().min(4),
                dropped: false,
                limited,
                client: None,
            };
            g.sample(sample, now);
        }
        g.snapshot(now)
    };
    feed(&mut g, 20, false, 1);
    // Slower for good (a new release), demand below the limit: never
    // confirmed, stale after 45–75 s, but nothing waits: no probe.
    let snap = feed(&mut g, 30, false, 90);
    assert_eq!(snap.baseline_stale_in_s, Some(0.0), "{snap:?}");
    assert_eq!(snap.baseline_source, Some(BaselineSource::FirstWindow));
    assert_ne!(snap.phase, Some(Phase::Probing));
    // The limit binds: the next window starts the probe, which measures the
    // new no-load latency.
    feed(&mut g, 30, true, 1);
    let snap = feed(&mut g, 30, false, 1);
    assert_eq!(
        snap.baseline_source,
        Some(BaselineSource::Probe),
        "{snap:?}"
    );
    assert!((29.0..=31.0).contains(&snap.baseline_ms.unwrap()));
}
