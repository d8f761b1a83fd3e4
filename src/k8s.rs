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
    spec:
      terminationGracePeriodSeconds: 30
      containers:
        - name: processor
          image: ghcr.io/example/vitals:latest
          args: [\"process\", \"{name}\"]
          env:
            - {{ name: VITALS_PROCESSORS__DATA_DIR, value: /data/state }}
            - {{ name: VITALS_PROCESSORS__METRICS_LISTEN, value: \"0.0.0.0:9464\" }}
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
",
            name = p.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
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
