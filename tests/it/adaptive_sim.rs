//! The adaptive limit in simulated time: the real admission `Controller` and
//! limit algorithm, open-loop Poisson arrivals, and an upstream of `workers`
//! slots that each take 20 ms (capacity 800 req/s at 16 workers), all on
//! tokio's paused clock. Minutes of traffic run in a second or two, and the
//! same seed gives the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluicegate::adaptive::{AdaptiveSettings, Bounds, GradientSettings};
use sluicegate::admission::{AdmissionMetrics, AdmissionSettings, Controller, Priority};
use sluicegate::jitter::Jitter;
use tokio::sync::Semaphore;
use tokio::time::Instant;

const SERVICE: Duration = Duration::from_millis(20);
/// Requests per second 16 workers serve.
const CAPACITY: f64 = 800.0;

/// The route of the benchmarks: queue 32, 100 ms.
fn admission() -> AdmissionSettings {
    AdmissionSettings {
        max_inflight: 16,
        queue_capacity: 32,
        queue_timeout: Duration::from_millis(100),
        ..AdmissionSettings::DEFAULT
    }
}

fn adaptive() -> Arc<Controller> {
    let bounds = Bounds {
        min: 1,
        max: 1000,
        initial: 10,
    };
    Controller::adaptive(
        admission(),
        AdaptiveSettings::Gradient(bounds, GradientSettings::default()),
        metrics(),
    )
}

fn fixed(limit: usize) -> Arc<Controller> {
    let settings = AdmissionSettings {
        max_inflight: limit,
        ..admission()
    };
    Controller::with_metrics(settings, metrics())
}

fn metrics() -> AdmissionMetrics {
    AdmissionMetrics::new("sim", &sluicegate::metrics::Registry::new())
}

/// An upstream whose worker count can change while it runs.
struct Upstream {
    slots: Arc<Semaphore>,
    workers: usize,
}

impl Upstream {
    fn new(workers: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(workers)),
            workers,
        }
    }

    /// Fewer workers take effect as busy ones finish, more at once.
    fn set_workers(&mut self, workers: usize) {
        if workers > self.workers {
            self.slots.add_permits(workers - self.workers);
        } else {
            let slots = self.slots.clone();
            let gone = (self.workers - workers) as u32;
            tokio::spawn(async move { slots.acquire_many(gone).await.unwrap().forget() });
        }
        self.workers = workers;
    }
}

/// What one simulation saw.
#[derive(Default)]
struct Run {
    /// Refusals per simulated second.
    shed: Vec<u32>,
    /// Answered per simulated second.
    answered: Vec<u32>,
    /// Admission to answer (queue wait included) of every answered request.
    latency: Vec<Duration>,
    /// Every 10 ms: (time, limit, requests in the system: in flight + queued).
    trace: Vec<(Duration, usize, usize)>,
}

impl Run {
    fn shed_total(&self, from: usize, to: usize) -> u32 {
        self.shed[from..to].iter().sum()
    }

    fn goodput(&self, from: usize, to: usize) -> f64 {
        self.answered[from..to].iter().sum::<u32>() as f64 / (to - from) as f64
    }

    fn p99_ms(&self) -> f64 {
        let mut v = self.latency.clone();
        v.sort_unstable();
        v[v.len() * 99 / 100].as_secs_f64() * 1000.0
    }

    /// The limit at `t`.
    fn limit_at(&self, t: Duration) -> usize {
        self.trace.iter().rev().find(|(at, ..)| *at <= t).unwrap().1
    }

    /// How long after `from` the limit first satisfied `ok`.
    fn first_after(&self, from: Duration, ok: impl Fn(usize) -> bool) -> Option<Duration> {
        let (t, ..) = self.trace.iter().find(|(t, l, _)| *t >= from && ok(*l))?;
        Some(*t - from)
    }
}

/// Offers `rate(second)` requests per second for `seconds` through
/// `controller` to `upstream`; `at(second, upstream)` runs as each second
/// starts.
async fn simulate(
    controller: Arc<Controller>,
    mut upstream: Upstream,
    seconds: usize,
    rate: impl Fn(usize) -> f64,
    mut at: impl FnMut(usize, &mut Upstream),
) -> Run {
    let start = Instant::now();
    let shed: Arc<Vec<AtomicUsize>> = Arc::new((0..seconds + 1).map(|_| 0.into()).collect());
    let answered: Arc<Vec<AtomicUsize>> = Arc::new((0..seconds + 1).map(|_| 0.into()).collect());
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let in_system = Arc::new(AtomicUsize::new(0));
    let tracer = {
        let (controller, in_system) = (controller.clone(), in_system.clone());
        tokio::spawn(async move {
            let mut trace = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let limit = controller.snapshot().limit.unwrap_or(usize::MAX);
                trace.push((start.elapsed(), limit, in_system.load(Ordering::Relaxed)));
                if start.elapsed() >= Duration::from_secs(seconds as u64) {
                    return trace;
                }
            }
        })
    };
    let mut random = Jitter::seeded(1);
    let mut next = start;
    for second in 0..seconds {
        at(second, &mut upstream);
        let end = start + Duration::from_secs(second as u64 + 1);
        let rate = rate(second);
        loop {
            // Exponential gaps: Poisson arrivals, bursts included.
            next += Duration::from_secs_f64(-(1.0 - random.unit()).ln() / rate);
            if next >= end {
                break;
            }
            tokio::time::sleep_until(next).await;
            let (controller, slots) = (controller.clone(), upstream.slots.clone());
            let (shed, answered, done, in_system) = (
                shed.clone(),
                answered.clone(),
                done_tx.clone(),
                in_system.clone(),
            );
            in_system.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let arrived = Instant::now();
                match controller.acquire(Priority::Normal).await {
                    Ok(mut permit) => {
                        let sent = Instant::now();
                        let worker = slots.acquire().await.unwrap();
                        tokio::time::sleep(SERVICE).await;
                        drop(worker);
                        permit.record(sent.elapsed(), false);
                        drop(permit);
                        let s = (arrived - start).as_secs() as usize;
                        answered[s.min(seconds)].fetch_add(1, Ordering::Relaxed);
                        let _ = done.send(arrived.elapsed());
                    }
                    Err(_) => {
                        let s = (arrived - start).as_secs() as usize;
                        shed[s.min(seconds)].fetch_add(1, Ordering::Relaxed);
                    }
                }
                in_system.fetch_sub(1, Ordering::Relaxed);
            });
        }
        tokio::time::sleep_until(end).await;
    }
    let trace = tracer.await.unwrap();
    drop(done_tx);
    let mut latency = Vec::new();
    while let Ok(l) = done_rx.try_recv() {
        latency.push(l);
    }
    let count = |v: &[AtomicUsize]| {
        v[..seconds]
            .iter()
            .map(|a| a.load(Ordering::Relaxed) as u32)
            .collect()
    };
    Run {
        shed: count(&shed),
        answered: count(&answered),
        latency,
        trace,
    }
}

fn limits(run: &Run, from: usize, to: usize) -> (usize, usize) {
    let (from, to) = (
        Duration::from_secs(from as u64),
        Duration::from_secs(to as u64),
    );
    run.trace
        .iter()
        .filter(|(t, ..)| *t >= from && *t < to)
        .fold((usize::MAX, 0), |(lo, hi), (_, l, _)| {
            (lo.min(*l), hi.max(*l))
        })
}

/// Half the upstream's capacity for five simulated minutes, from a fresh
/// start: nothing is refused, and the limit is never below the requests
/// asking to be served (checked every 10 ms). Before issue 17 the baseline
/// probe at `min_limit` shed ~170 requests at start and every minute.
#[tokio::test(start_paused = true)]
async fn a_steady_half_load_is_never_shed_nor_held_back() {
    let run = simulate(
        adaptive(),
        Upstream::new(16),
        300,
        |_| 0.5 * CAPACITY,
        |_, _| {},
    )
    .await;
    let (lo, hi) = limits(&run, 0, 300);
    eprintln!("0.5x: shed {}, limit {lo}..={hi}", run.shed_total(0, 300));
    assert_eq!(run.shed_total(0, 300), 0, "shed per second: {:?}", run.shed);
    let below: Vec<_> = run.trace.iter().filter(|(_, l, d)| l < d).collect();
    assert!(below.is_empty(), "limit below demand at {below:?}");
}

/// At 0.8× the adaptive limit refuses no more than the static limit that
/// fits the upstream, over five minutes from a fresh start, and after its
/// first second the limit is never below the demand. It does not creep up
/// either: a calm route keeps a limit a surge would still meet.
#[tokio::test(start_paused = true)]
async fn four_fifths_of_capacity_sheds_no_more_than_the_right_static_limit() {
    let load = |_| 0.8 * CAPACITY;
    let run = simulate(adaptive(), Upstream::new(16), 300, load, |_, _| {}).await;
    let fixed = simulate(fixed(16), Upstream::new(16), 300, load, |_, _| {}).await;
    let (lo, hi) = limits(&run, 1, 300);
    eprintln!(
        "0.8x: shed {} (static 16: {}), limit {lo}..={hi}",
        run.shed_total(0, 300),
        fixed.shed_total(0, 300)
    );
    assert!(run.shed_total(0, 300) <= fixed.shed_total(0, 300));
    let below = run
        .trace
        .iter()
        .filter(|(t, l, d)| *t >= Duration::from_secs(1) && l < d)
        .count();
    assert_eq!(below, 0);
    assert!(hi <= 100, "the limit crept up to {hi}");
}

/// 1.5× the capacity; the upstream loses half its workers at 30 s and gets
/// them back at 60 s. The limit follows both within 5 s, and goodput stays
/// at what the workers can do.
#[tokio::test(start_paused = true)]
async fn a_halving_of_capacity_is_followed_both_ways() {
    let run = simulate(
        adaptive(),
        Upstream::new(16),
        90,
        |_| 1.5 * CAPACITY,
        |second, upstream| match second {
            30 => upstream.set_workers(8),
            60 => upstream.set_workers(16),
            _ => {}
        },
    )
    .await;
    let down = run.first_after(Duration::from_secs(30), |l| l <= 13);
    let up = run.first_after(Duration::from_secs(60), |l| l >= 16);
    eprintln!(
        "halving followed in {down:?}, doubling in {up:?}; goodput {:.0} / {:.0} / {:.0}",
        run.goodput(20, 30),
        run.goodput(40, 60),
        run.goodput(70, 90)
    );
    assert!(
        down.is_some_and(|d| d <= Duration::from_secs(5)),
        "{down:?}"
    );
    assert!(up.is_some_and(|d| d <= Duration::from_secs(5)), "{up:?}");
    assert!(run.limit_at(Duration::from_secs(50)) <= 14);
    assert!(run.goodput(20, 30) >= 0.95 * CAPACITY);
    assert!(run.goodput(40, 60) >= 0.9 * CAPACITY / 2.0);
    assert!(run.goodput(70, 90) >= 0.95 * CAPACITY);
}

/// Four times the capacity for two minutes (two probes): goodput at least 90 % of the
/// static limit that fits the upstream, admitted p99 (queue wait included)
/// within the clients' 250 ms.
#[tokio::test(start_paused = true)]
async fn a_fourfold_overload_keeps_goodput_and_latency() {
    let load = |_| 4.0 * CAPACITY;
    let run = simulate(adaptive(), Upstream::new(16), 120, load, |_, _| {}).await;
    let fixed = simulate(fixed(16), Upstream::new(16), 120, load, |_, _| {}).await;
    let (good, best) = (run.goodput(0, 120), fixed.goodput(0, 120));
    eprintln!(
        "4x: goodput {good:.0} (static 16: {best:.0}), p99 {:.1} ms (static {:.1})",
        run.p99_ms(),
        fixed.p99_ms()
    );
    assert!(good >= 0.9 * best);
    assert!(run.p99_ms() <= 250.0);
}
