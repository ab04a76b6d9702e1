//! The README's canary, run as written: its commands, with the test's binary for
//! `cargo run --release --` and free ports for the fixed ones (so it can run beside
//! other tests), the example config rewritten to the same ports.

use std::net::TcpListener;

#[test]
fn the_readme_canary_runs_as_written() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let section = &readme[readme.find("## Try a canary").expect("a canary section")..];
    let start = section.find("```sh\n").unwrap() + "```sh\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    // Free ports for the README's fixed ones (taken, then released for the servers).
    let fixed = ["8080", "9901", "9001", "9002", "9003"];
    let free: Vec<String> = fixed
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect::<Vec<_>>()
        .iter()
        .map(|l| l.local_addr().unwrap().port().to_string())
        .collect();
    let remap = |text: &str| {
        let mut text = text.to_string();
        for (from, to) in fixed.iter().zip(&free) {
            text = text.replace(&format!(":{from}"), &format!(":{to}"));
            text = text.replace(&format!(" {from}/"), &format!(" {to}/"));
        }
        text
    };
    let dir = std::env::temp_dir().join(format!("switchyard-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("canary.yaml");
    std::fs::write(
        &config,
        remap(&std::fs::read_to_string("examples/canary.yaml").unwrap()),
    )
    .unwrap();
    let script = remap(block)
        .replace("cargo run --release --", env!("CARGO_BIN_EXE_switchyard"))
        .replace("examples/canary.yaml", config.to_str().unwrap());
    assert!(
        !script.contains(":8080") && !script.contains("9901/"),
        "{script}"
    );
    // Whatever happens, the background servers go (the script's own `kill` is its last line).
    let guarded = format!("set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&guarded)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(": ok (1 model, 3 variants"),
        "validate: {stdout}"
    );
    assert!(stdout.contains("HTTP/1.1 200"), "the prediction: {stdout}");
    assert!(stdout.contains("x-switchyard-variant:"), "{stdout}");
    assert!(stdout.contains("\"predictions\""), "{stdout}");
    assert!(
        stdout.contains("switchyard_requests_total{"),
        "the metrics: {stdout}"
    );
}
