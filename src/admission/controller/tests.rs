use std::sync::mpsc;

use metrics::{Gauge, GaugeFn};

use super::*;
use crate::admission::Priority;

/// A gauge whose next update, once held, waits for a go.
#[derive(Default)]
struct HeldGauge {
    value: Mutex<f64>,
    hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl HeldGauge {
    fn update(&self, f: impl FnOnce(&mut f64)) {
        let hold = self.hold.lock().unwrap().take();
        if let Some((held, go)) = hold {
            held.send(()).unwrap();
            go.recv().unwrap();
        }
        f(&mut self.value.lock().unwrap());
    }
}

impl GaugeFn for HeldGauge {
    fn increment(&self, v: f64) {
        self.update(|x| *x += v);
    }
    fn decrement(&self, v: f64) {
        self.update(|x| *x -= v);
    }
    fn set(&self, v: f64) {
        self.update(|x| *x = v);
    }
}

/// Two requests on a route without admission finish at once, and the
/// first one's gauge update lands last: the gauge must still say 0.
#[test]
fn an_idle_route_without_admission_shows_nothing_in_flight() {
    let gauge = Arc::new(HeldGauge::default());
    let metrics = AdmissionMetrics {
        inflight: Gauge::from_arc(gauge.clone()),
        ..AdmissionMetrics::noop()
    };
    let c = Controller::with_metrics(AdmissionSettings::UNLIMITED, metrics);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let a = rt.block_on(c.acquire(Priority::Normal)).unwrap();
    let b = rt.block_on(c.acquire(Priority::Normal)).unwrap();
    let (held, is_held) = mpsc::channel();
    let (go, release) = mpsc::channel();
    *gauge.hold.lock().unwrap() = Some((held, release));
    let first = std::thread::spawn(move || drop(a));
    is_held.recv().unwrap(); // a's update is on its way, not applied
    drop(b);
    go.send(()).unwrap();
    first.join().unwrap();
    assert_eq!(c.snapshot().inflight, 0);
    assert_eq!(*gauge.value.lock().unwrap(), 0.0);
}
