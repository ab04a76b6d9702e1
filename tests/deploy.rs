//! The deployment files agree with themselves and with Switchyard: every manifest parses;
//! the configs in the ConfigMap and the image pass the checks `serve` runs; probe paths
//! and ports, container ports, the config and token mounts match the config; the grace
//! period covers the drain; the Dockerfile exposes the ports the image's config listens
//! on and probes the admin port.

use yaml_rust2::{Yaml, YamlLoader};

fn docs(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn port(addr: std::net::SocketAddr) -> i64 {
    i64::from(addr.port())
}

fn seconds(d: std::time::Duration) -> i64 {
    d.as_secs() as i64
}

#[test]
fn the_kubernetes_manifests_match_the_config_they_carry() {
    let docs = docs("deploy/kubernetes/switchyard.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let text = kind("ConfigMap")["data"]["config.yaml"].as_str().unwrap();
    let config =
        switchyard::parse_config(text).unwrap_or_else(|e| panic!("{}", e.render("ConfigMap")));
    let pod = &kind("Deployment")["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().unwrap();
    let sidecar = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("switchyard"))
        .unwrap();
    let named_port = |name: &str| {
        sidecar["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap()["containerPort"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(named_port("data"), port(config.listen));
    assert_eq!(named_port("admin"), port(config.admin_listen));
    assert!(
        config.listen.ip().is_unspecified(),
        "the data plane listens beyond the Pod's loopback"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            get["port"].as_i64(),
            Some(port(config.admin_listen)),
            "{probe}"
        );
    }
    let annotations = &kind("Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"]
            .as_str()
            .map(|p| p.parse::<i64>().unwrap()),
        Some(port(config.admin_listen))
    );
    // The grace period covers the preStop pause and the whole drain.
    let pause: i64 = sidecar["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        grace > pause + seconds(config.drain_timeout),
        "grace {grace} s ≤ {pause} s + drain_timeout"
    );
    // The config and the token are where the config and the args say.
    let mount = |volume: &str| {
        sidecar["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .unwrap()["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let args: Vec<&str> = sidecar["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "serve",
            "--config",
            &format!("{}/config.yaml", mount("config")),
            // An edited ConfigMap reaches the mounted file; --watch reloads it.
            "--watch"
        ]
    );
    assert_eq!(
        config.admin_token_file.as_deref(),
        Some(format!("{}/token", mount("admin-token")).as_str())
    );
    let state = config.state_file.as_deref().unwrap();
    assert!(state.starts_with(&mount("state")), "{state}");
    // The model server listens where the config's upstream points.
    let server = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("model-server"))
        .unwrap();
    let server_args: Vec<&str> = server["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let listen = server_args[server_args.iter().position(|a| *a == "--listen").unwrap() + 1];
    let upstream = config.models["digits"].variants[0]
        .upstream
        .as_ref()
        .unwrap();
    assert_eq!(upstream.authority, listen);
    // The Service targets the data port by name.
    let service = kind("Service");
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("data")
    );
}

#[test]
fn the_dockerfile_exposes_and_probes_what_its_config_listens_on() {
    let dockerfile = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    let config =
        switchyard::parse_config(&std::fs::read_to_string("deploy/container.yaml").unwrap())
            .unwrap_or_else(|e| panic!("{}", e.render("deploy/container.yaml")));
    let expose = dockerfile
        .lines()
        .find(|l| l.starts_with("EXPOSE "))
        .unwrap();
    for p in [config.listen.port(), config.admin_listen.port()] {
        assert!(
            expose.split_whitespace().any(|w| w == p.to_string()),
            "{expose} lacks {p}"
        );
    }
    let health = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .unwrap();
    assert!(
        health.contains(&format!("/{}", config.admin_listen.port())) && health.contains("/healthz"),
        "{health}"
    );
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .unwrap();
    assert!(!user.contains("root") && user != "USER 0", "{user}");
    assert!(
        dockerfile.contains("--profile dist"),
        "the image ships the stripped build"
    );
    assert!(dockerfile.contains("COPY deploy/container.yaml /etc/switchyard/config.yaml"));
}
