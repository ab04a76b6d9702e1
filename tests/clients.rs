//! Real clients, as users run them: tritonclient 2.73 (HTTP and gRPC) and kserve's
//! InferenceRESTClient, in the venv `scripts/test` makes (`target/venv-tests`, or the
//! Python named by `SWITCHYARD_TEST_PYTHON`), against the sidecar serving a local
//! variant and a remote one (a second Switchyard, `model-server`, reached over HTTP and
//! over gRPC). The checks are in `tests/clients/check_clients.py`.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_and_kserve_clients_over_http_and_grpc() {
    let python = std::env::var("SWITCHYARD_TEST_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/target/venv-tests/bin/python",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: scripts/test makes it (a venv with tritonclient[http,grpc] and kserve)"
    );
    let (mut server, served) = spawn_switchyard([
        "model-server",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--model",
        "builtin:digits_mlp",
        "--name",
        "served",
    ]);
    let app = start(&format!(
        "models:\n  digits:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\", batching: {{max_batch_size: 32}}}}}}\n  remote:\n    variants:\n      - {{name: web, weight: 1, upstream: \"http://{served}\", upstream_model: served}}\n      - {{name: rpc, weight: 1, upstream: \"http://{served}\", upstream_model: served, protocol: grpc}}\n"
    ))
    .await;
    let addr = app.data_addr.to_string();
    // One process per client: both register protobuf messages named `inference.*`.
    let mut failures = Vec::new();
    for which in ["triton", "kserve"] {
        let (python, addr) = (python.clone(), addr.clone());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .args([
                    "tests/clients/check_clients.py",
                    which,
                    &addr,
                    "models/digits_test_vectors.json",
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{text}");
        if !out.status.success() || !text.contains("checks passed") {
            failures.push(format!("{which}:\n{text}"));
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    app.shutdown();
    app.wait().await;
}
