//! The Kubernetes manifests derived from the registry: one StatefulSet per registered processor
//! (`k8s/processors.yaml`). A test keeps the checked-in file equal to what is derived; after
//! adding a processor, `VITALS_BLESS=1 cargo nextest run -p vitals k8s` rewrites it.

/// `k8s/processors.yaml` for every registered processor, in registry order.
pub fn processors_yaml() -> String {
    let mut out = String::from(
        "# One StatefulSet per processor (chained product_impact included): each pod keeps its tasks' local stores on its own volume, so a
# restarted pod resumes from its checkpoints instead of replaying its partitions. Pods share the
# consumer group; partitions are spread over them by the range assignor.
# Derived from the processors' registry (src/k8s.rs): regenerate, do not edit.
",
    );
    for (i, p) in vitals_runtime::registry().iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let app = format!("vitals-{}", p.name.replace('_', "-"));
        out.push_str(&format!(
            "apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {app}
spec:
  serviceName: {app}
  replicas: 3
  selector: {{ matchLabels: {{ app: {app} }} }}
  template:
    metadata:
      labels: {{ app: {app} }}
      annotations: {{ prometheus.io/scrape: \"true\", prometheus.io/port: \"9464\", prometheus.io/path: /metrics }}
    spec:
      terminationGracePeriodSeconds: 30
      securityContext: {{ runAsNonRoot: true, runAsUser: 10001, fsGroup: 10001 }}
      containers:
        - name: processor
          image: ghcr.io/example/vitals:latest
          args: [\"process\", \"{name}\"]
          env:
            - {{ name: VITALS_PROCESSORS__DATA_DIR, value: /data/state }}
            - {{ name: VITALS_PROCESSORS__METRICS_LISTEN, value: \"0.0.0.0:9464\" }}
          ports:
            - {{ name: metrics, containerPort: 9464 }}
          # Not ready while a task restores or waits for a dependency; alive while it serves.
          readinessProbe: {{ httpGet: {{ path: /readyz, port: metrics }}, periodSeconds: 10, failureThreshold: 3 }}
          livenessProbe: {{ httpGet: {{ path: /healthz, port: metrics }}, periodSeconds: 10, failureThreshold: 6 }}
          envFrom:
            - configMapRef: {{ name: vitals-config }}
            - secretRef: {{ name: vitals-secrets }}
          volumeMounts:
            - {{ name: state, mountPath: /data }}
          resources:
            requests: {{ cpu: 500m, memory: 256Mi }}
            limits: {{ memory: 1Gi }}
  volumeClaimTemplates:
    - metadata: {{ name: state }}
      spec:
        accessModes: [\"ReadWriteOnce\"]
        resources: {{ requests: {{ storage: 10Gi }} }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {app}
spec:
  # One pod at a time: its tasks move to the others (a takeover each), never all at once.
  maxUnavailable: 1
  selector: {{ matchLabels: {{ app: {app} }} }}
",
            name = p.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every `VITALS_*` setting a YAML value names: mapping entries (`data`, `stringData`,
    /// `x-vitals-env`) and container `env` items (`name` + `value`).
    fn vitals_env(v: &serde_yaml::Value, out: &mut BTreeMap<String, String>) {
        use serde_yaml::Value;
        match v {
            Value::Mapping(m) => {
                let name = m.get("name").and_then(Value::as_str).filter(|n| n.starts_with("VITALS_"));
                if let (Some(name), Some(value)) = (name, m.get("value")) {
                    out.insert(name.to_owned(), scalar(value));
                }
                for (k, v) in m {
                    match k.as_str() {
                        Some(k) if k.starts_with("VITALS_") => {
                            out.insert(k.to_owned(), scalar(v));
                        }
                        _ => vitals_env(v, out),
                    }
                }
            }
            Value::Sequence(s) => s.iter().for_each(|v| vitals_env(v, out)),
            _ => {}
        }
    }

    fn scalar(v: &serde_yaml::Value) -> String {
        match v {
            serde_yaml::Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
        }
    }

    fn documents(path: &Path) -> Vec<serde_yaml::Value> {
        use serde::Deserialize;
        let text = std::fs::read_to_string(path).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| {
                let mut v = serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
                v.apply_merge().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                v
            })
            .collect()
    }

    /// Every manifest (the kustomization aside) is valid against the Kubernetes API schemas of a
    /// current release, with `kubernetes-validate` from PyPI (installed once into
    /// `~/.cache/vitals/venv-k8s-validate`); `--strict` also refuses fields the API does not know.
    #[test]
    fn k8s_manifests_are_valid_kubernetes_objects() {
        const VERSION: &str = "1.37.0";
        let cache = std::env::var("VITALS_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/vitals"));
        let venv = cache.join("venv-k8s-validate");
        let bin = venv.join("bin/kubernetes-validate");
        if !bin.exists() {
            std::fs::create_dir_all(&cache).unwrap();
            let ok = std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).status().unwrap().success();
            assert!(ok, "python3 -m venv {}", venv.display());
            let out = std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "-q", &format!("kubernetes-validate=={VERSION}")])
                .output()
                .unwrap();
            assert!(out.status.success(), "installing kubernetes-validate: {}", String::from_utf8_lossy(&out.stderr));
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");
        let mut files: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"));
        files.sort();
        let out = std::process::Command::new(&bin).args(["--strict", "-k", "1.30.0"]).args(&files).output().unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !report.contains("ERROR"), "kubernetes-validate:\n{report}");
        let validated = report.lines().filter(|l| l.contains("passed for resource")).count();
        assert!(validated >= files.len(), "fewer objects validated ({validated}) than files ({}):\n{report}", files.len());
    }

    /// The `docker compose config`-style check that can run without Docker: the compose file and
    /// every manifest parse, every vitals setting they name is a key of config/default.toml with
    /// a value of its type (the configuration loads with them), and the compose services agree
    /// with the defaults vitals connects with.
    #[test]
    fn deployment_files_parse_and_name_only_real_settings() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![root.join("docker-compose.kafka.yml")];
        let mut manifests: Vec<_> = std::fs::read_dir(root.join("k8s")).unwrap().map(|e| e.unwrap().path()).collect();
        manifests.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
        manifests.sort();
        files.extend(manifests);
        for file in &files {
            let mut env = BTreeMap::new();
            for doc in documents(file) {
                vitals_env(&doc, &mut env);
            }
            crate::config::Config::from_sources(None, &env).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
        }

        let compose = documents(&files[0]).remove(0);
        let defaults = crate::config::Config::from_sources(None, &BTreeMap::new()).unwrap();
        let minio = &compose["services"]["minio"]["environment"];
        assert_eq!(minio["MINIO_ROOT_USER"].as_str(), Some(defaults.s3.access_key_id.as_str()));
        assert_eq!(minio["MINIO_ROOT_PASSWORD"].as_str(), Some(defaults.s3.secret_access_key.expose()));
        let brokers: Vec<&serde_yaml::Value> =
            (1..=3).map(|n| &compose["services"][format!("kafka-{n}").as_str()]["environment"]).collect();
        for (i, b) in brokers.iter().enumerate() {
            assert_eq!(b["KAFKA_MIN_INSYNC_REPLICAS"].as_u64(), Some(2), "kafka-{}", i + 1);
            assert_eq!(b["KAFKA_DEFAULT_REPLICATION_FACTOR"].as_u64(), Some(3), "kafka-{}", i + 1);
            // The registry's container reaches the brokers by the INTERNAL name they advertise.
            let advertised = b["KAFKA_ADVERTISED_LISTENERS"].as_str().unwrap();
            assert!(advertised.contains(&format!("INTERNAL://kafka-{}:29092", i + 1)), "{advertised}");
        }
        let vitals = crate::config::Config::from_sources(None, &{
            let mut env = BTreeMap::new();
            vitals_env(&compose["x-vitals-env"], &mut env);
            env
        })
        .unwrap();
        assert_eq!((vitals.kafka.replication_factor, vitals.kafka.min_insync_replicas), (3, 2));
    }

    /// Every registered processor has its StatefulSet, and the file is exactly what is derived.
    #[test]
    fn k8s_processors_yaml_is_derived_from_the_registry() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/processors.yaml");
        let want = super::processors_yaml();
        if std::env::var_os("VITALS_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap();
        for p in vitals_runtime::registry() {
            assert!(want.contains(&format!("args: [\"process\", \"{}\"]", p.name)), "{}", p.name);
        }
        assert!(have == want, "k8s/processors.yaml is not what the registry derives: run `VITALS_BLESS=1 cargo nextest run -p vitals k8s` and review the diff");
    }
}
