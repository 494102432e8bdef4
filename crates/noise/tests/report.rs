//! The benchmark through its library API: a short real measurement, its
//! JSON and its SVG chart, and the errors for bad input.

use std::collections::HashMap;

use lwk_noise::{allowed_online_cpus, measure, plot, write_table, CpuList, NoiseArgs, NoiseReport};

fn args(samples: usize, quantum_us: u32) -> NoiseArgs {
    NoiseArgs { cpus: None, samples, quantum_us, svg: None, json: None, log_y: false }
}

fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

fn short_run() -> NoiseReport {
    measure(&args(200, 20), &mut quiet()).expect("a short measurement")
}

fn check_consistent(report: &NoiseReport) {
    for c in &report.cpus {
        let s = &c.summary;
        assert_eq!(s.samples, report.samples);
        assert_eq!(c.durations_us.len(), report.samples);
        assert!(s.min_us > 0.0, "{s:?}");
        assert!(s.min_us <= s.median_us && s.median_us <= s.p99_us && s.p99_us <= s.max_us, "{s:?}");
        assert!((0.0..100.0).contains(&s.noise_percent), "{s:?}");
        let min = c.durations_us.iter().copied().fold(f64::INFINITY, f64::min);
        let max = c.durations_us.iter().copied().fold(0.0, f64::max);
        assert_eq!((min, max), (s.min_us, s.max_us));
    }
}

#[test]
fn a_short_run_measures_every_allowed_cpu() {
    let report = short_run();
    let cpus: Vec<usize> = report.cpus.iter().map(|c| c.cpu).collect();
    assert_eq!(cpus, allowed_online_cpus().unwrap());
    assert_eq!(report.quantum_us, 20);
    assert!(report.loop_iterations > 0 && report.tsc_hz > 0.0);
    check_consistent(&report);

    let mut table = Vec::new();
    write_table(&report, &mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("FWQ: quantum 20 us"), "{table}");
    assert!(lines[1].split_whitespace().eq(["cpu", "samples", "min_us", "median_us", "p99_us", "max_us", "noise_%"]));
    assert_eq!(lines.len(), 2 + cpus.len(), "{table}");
    for (line, cpu) in lines[2..].iter().zip(&cpus) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], cpu.to_string());
        assert_eq!(fields[1], "200");
    }
}

#[test]
fn json_holds_the_table_and_the_raw_durations() {
    let report = short_run();
    let value: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(value["benchmark"], "fwq");
    assert_eq!(value["samples"], 200);
    let cpus = value["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), report.cpus.len());
    for (v, c) in cpus.iter().zip(&report.cpus) {
        assert_eq!(v["cpu"], c.cpu);
        assert_eq!(v["durations_us"].as_array().unwrap().len(), 200);
        for key in ["samples", "min_us", "median_us", "p99_us", "max_us", "noise_percent"] {
            assert!(v[key].is_number(), "{key} missing in {v}");
        }
        assert_eq!(v["max_us"].as_f64().unwrap(), c.summary.max_us);
    }
}

/// The fill colour of every filled circle, counted.
fn circles_by_fill(doc: &roxmltree::Document) -> HashMap<String, usize> {
    let mut fills = HashMap::new();
    for n in doc.descendants().filter(|n| n.has_tag_name("circle")) {
        *fills.entry(n.attribute("fill").unwrap_or("").to_string()).or_insert(0) += 1;
    }
    fills
}

#[test]
fn svg_is_valid_xml_with_one_series_per_cpu() {
    let report = short_run();
    let dir = tempfile::tempdir().unwrap();
    for log_y in [false, true] {
        let path = dir.path().join(format!("noise-{log_y}.svg"));
        plot::write_svg(&report, &path, log_y).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc = roxmltree::Document::parse(&text).expect("the SVG parses as XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or("").trim().to_string())
            .collect();
        assert!(texts.iter().any(|t| t.contains("quantum 20 µs") && t.contains("200 samples")), "{texts:?}");
        // One legend entry and one colour of points per CPU, with the
        // legend marker among them.
        let fills = circles_by_fill(&doc);
        assert_eq!(fills.len(), report.cpus.len(), "{fills:?}");
        for c in &report.cpus {
            assert_eq!(texts.iter().filter(|t| t.starts_with(&format!("CPU {}:", c.cpu))).count(), 1, "{texts:?}");
        }
        // Points on the same pixel are drawn once: at most a point per sample.
        assert!(fills.values().all(|&n| (2..=200 + 1).contains(&n)), "{fills:?}");
    }
}

#[test]
fn zero_samples_is_an_error() {
    let err = measure(&args(0, 20), &mut quiet()).unwrap_err().to_string();
    assert!(err.contains("--samples"), "{err}");
}

#[test]
fn zero_or_huge_quantum_is_an_error() {
    for q in [0, 2_000_000] {
        let err = measure(&args(10, q), &mut quiet()).unwrap_err().to_string();
        assert!(err.contains("--quantum-us"), "{err}");
    }
}

#[test]
fn a_cpu_that_is_not_online_is_named() {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let beyond = *lwk_partition::parse_cpu_list(&online).unwrap().last().unwrap() + 1;
    let mut a = args(10, 20);
    a.cpus = Some(CpuList(vec![beyond]));
    let err = measure(&a, &mut quiet()).unwrap_err().to_string();
    assert!(err.contains(&format!("CPU {beyond} is not online")), "{err}");
}

#[test]
#[ignore = "needs two CPUs this process may run on"]
fn a_cpu_outside_the_affinity_mask_is_named() {
    let cpus = allowed_online_cpus().unwrap();
    assert!(cpus.len() >= 2, "this test needs two CPUs this process may run on, it has {cpus:?}");
    // The check reads the calling thread's mask: restrict a thread of our own.
    let (first, other) = (cpus[0], cpus[1]);
    let err = std::thread::spawn(move || {
        lwk_noise::fwq::pin_current_thread(first).unwrap();
        let mut a = args(10, 20);
        a.cpus = Some(CpuList(vec![other]));
        measure(&a, &mut |_: &str| {}).unwrap_err().to_string()
    })
    .join()
    .unwrap();
    assert!(err.contains(&format!("CPU {other} is not in this process's CPU affinity mask")), "{err}");
}

#[test]
fn a_missing_output_directory_is_caught_before_measuring() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(10, 20);
    a.json = Some(dir.path().join("no/such/dir/out.json"));
    let err = measure(&a, &mut quiet()).unwrap_err().to_string();
    assert!(err.contains("--json") && err.contains("does not exist"), "{err}");
    let mut a = args(10, 20);
    a.svg = Some(dir.path().to_path_buf());
    let err = measure(&a, &mut quiet()).unwrap_err().to_string();
    assert!(err.contains("--svg") && err.contains("is a directory"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
