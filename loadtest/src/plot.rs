//! `--plot FILE.svg`: the run as a picture for a review — latency p99 per
//! second, deliveries per second and clients online over time, and the
//! latency distribution of the whole run (for the connecting scenarios:
//! setup time p99 per second, setups per second and clients connected, the
//! setup time distribution).

use std::path::Path;

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// What a run plots: `(seconds, value)` points per second, and the
/// run's latency histogram (µs).
pub struct Series<'a> {
    pub title: &'a str,
    pub p99_ms: Vec<(f64, f64)>,
    pub deliveries_per_second: Vec<(f64, f64)>,
    pub online: Vec<(f64, f64)>,
    pub latency: &'a Histogram<u64>,
    /// The three charts' captions, top to bottom.
    pub captions: [&'a str; 3],
    /// Moments to mark on the time charts (seconds, label): the faults.
    pub marks: Vec<(f64, String)>,
}

/// The captions of a run measured by its deliveries.
const DELIVERIES: [&str; 3] = [
    "publish → deliver p99 of each second (live deliveries)",
    "deliveries per second (red) and clients online (blue)",
    "latency distribution of the run (live deliveries)",
];

/// The captions of a reconnect wave.
pub const RECONNECTS: [&str; 3] = [
    "connect → connected p99 of each second (the clients coming back)",
    "reconnects per second (red) and clients connected again (blue)",
    "connect → connected distribution of the wave",
];

/// The captions of a run measured by its setups.
pub const SETUPS: [&str; 3] = [
    "setup time p99 of each second (TCP connect → subscribed)",
    "setups per second (red) and clients connected (blue)",
    "setup time distribution of the run",
];

impl<'a> Series<'a> {
    /// The series of a run's seconds: `(seconds in, p99 µs of that second,
    /// deliveries per second, clients connected)` each.
    pub fn of_seconds(
        title: &'a str,
        latency: &'a Histogram<u64>,
        seconds: impl IntoIterator<Item = (f64, Option<u64>, f64, f64)>,
    ) -> Series<'a> {
        let mut s = Series {
            title,
            p99_ms: Vec::new(),
            deliveries_per_second: Vec::new(),
            online: Vec::new(),
            latency,
            captions: DELIVERIES,
            marks: Vec::new(),
        };
        for (t, p99_us, per_second, online) in seconds {
            if let Some(us) = p99_us {
                s.p99_ms.push((t, us as f64 / 1000.0));
            }
            s.deliveries_per_second.push((t, per_second));
            s.online.push((t, online));
        }
        s
    }

    /// The same picture with these moments marked.
    pub fn marked(self, marks: Vec<(f64, String)>) -> Series<'a> {
        Series { marks, ..self }
    }

    /// The same picture with other captions (such as [`SETUPS`]).
    pub fn captioned(self, captions: [&'a str; 3]) -> Series<'a> {
        Series { captions, ..self }
    }
}

fn upper(points: &[(f64, f64)]) -> f64 {
    points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1
}

/// Writes the SVG.
pub fn svg(path: &Path, s: &Series<'_>) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(s.title, ("sans-serif", 22)).map_err(e)?;
    let areas = root.split_evenly((3, 1));
    let t_max = s
        .p99_ms
        .iter()
        .chain(&s.deliveries_per_second)
        .map(|p| p.0)
        .fold(1.0, f64::max);

    // 1. p99 of each second.
    let mut c = ChartBuilder::on(&areas[0])
        .caption(s.captions[0], ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..upper(&s.p99_ms))
        .map_err(e)?;
    c.configure_mesh()
        .x_desc("s")
        .y_desc("ms")
        .draw()
        .map_err(e)?;
    c.draw_series(LineSeries::new(s.p99_ms.iter().copied(), &RED))
        .map_err(e)?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    let top = upper(&s.p99_ms);
    c.draw_series(
        s.marks
            .iter()
            .map(|(t, _)| PathElement::new(vec![(*t, 0.0), (*t, top)], BLACK.mix(0.4))),
    )
    .map_err(e)?;
    c.draw_series(
        s.marks
            .iter()
            .map(|(t, label)| Text::new(label.clone(), (*t, top * 0.97), ("sans-serif", 12))),
    )
    .map_err(e)?;
    c.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(e)?;

    // 2. Deliveries per second and clients online.
    let mut c = ChartBuilder::on(&areas[1])
        .caption(s.captions[1], ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..upper(&s.deliveries_per_second))
        .map_err(e)?
        .set_secondary_coord(0.0..t_max, 0.0..upper(&s.online));
    c.configure_mesh()
        .x_desc("s")
        .y_desc("per second")
        .draw()
        .map_err(e)?;
    c.configure_secondary_axes()
        .y_desc("online")
        .draw()
        .map_err(e)?;
    c.draw_series(LineSeries::new(
        s.deliveries_per_second.iter().copied(),
        &RED,
    ))
    .map_err(e)?;
    c.draw_secondary_series(LineSeries::new(s.online.iter().copied(), &BLUE))
        .map_err(e)?;
    let top = upper(&s.deliveries_per_second);
    c.draw_series(
        s.marks
            .iter()
            .map(|(t, _)| PathElement::new(vec![(*t, 0.0), (*t, top)], BLACK.mix(0.4))),
    )
    .map_err(e)?;

    // 3. The latency distribution: the value at each percentile.
    let dist: Vec<(f64, f64)> = (0..=999)
        .map(|i| {
            let q = f64::from(i) / 1000.0;
            (q * 100.0, s.latency.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    let mut c = ChartBuilder::on(&areas[2])
        .caption(s.captions[2], ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..100.0, 0.0..upper(&dist))
        .map_err(e)?;
    c.configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .draw()
        .map_err(e)?;
    c.draw_series(LineSeries::new(dist, &BLACK)).map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
