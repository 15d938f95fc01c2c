use super::*;

#[tokio::test(start_paused = true)]
async fn a_pause_doubles_honours_retry_after_and_clears() {
    let mut p = Pause::new();
    let start = Instant::now();
    let waits: Vec<Duration> = (0..12)
        .map(|_| {
            p.until = None;
            p.extend(BACKOFF_MAX, None);
            p.until.unwrap() - start
        })
        .collect();
    // Each step within [step/2, step], doubling to the cap.
    for (i, wait) in waits.iter().enumerate() {
        let step = BACKOFF_MIN.saturating_mul(1 << i).min(BACKOFF_MAX);
        assert!(*wait >= step / 2 && *wait <= step, "{i}: {wait:?}");
    }
    p.until = None;
    p.extend(BACKOFF_MAX, Some(Duration::from_secs(70)));
    assert!(p.until.unwrap() - start >= Duration::from_secs(70));
    p.succeeded();
    assert_eq!(p.failures, 0);
    assert!(p.until().is_some(), "a pause in force runs out by itself");
}

#[test]
fn the_pace_starts_at_one_doubles_per_round_and_halves() {
    let mut pace = Pace {
        window: 1,
        running: 0,
        bytes: 0,
    };
    // A round of successes doubles the window: 1, 2, 4, 8, 16, 32.
    let mut rounds = vec![pace.window];
    while pace.window < MAX_INFLIGHT {
        for _ in 0..pace.window {
            grow(&mut pace);
        }
        rounds.push(pace.window);
    }
    assert_eq!(rounds, [1, 2, 4, 8, 16, 32]);
    halve(&mut pace);
    assert_eq!(pace.window, 16);
    restart(&mut pace);
    assert_eq!(pace.window, 1);
    // Memory: a large request goes alone, never beside others.
    pace.window = 8;
    pace.running = 1;
    pace.bytes = 1;
    assert!(!pace.room(MAX_INFLIGHT_BYTES));
    pace.running = 0;
    pace.bytes = 0;
    assert!(pace.room(2 * MAX_INFLIGHT_BYTES));
}
