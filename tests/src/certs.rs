//! Certificates for TLS tests, made with `openssl` under a CA of the test's own.

use crate::TestDir;
use std::path::PathBuf;
use std::process::Command;

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a second
/// CA that signed nothing here.
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    pub fn make(dir: &TestDir) -> Self {
        let certs = Self {
            dir: dir.path().join("certs"),
        };
        std::fs::create_dir_all(&certs.dir).expect("mkdir certs");
        certs.authority("ca");
        certs.authority("other-ca");
        certs.signed(
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        certs.signed("client", "extendedKeyUsage=clientAuth\n");
        certs
    }

    /// The file `name` (`ca.crt`, `server.key`, …).
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn authority(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=taskhost test {name}"),
            "-keyout",
            &self.path(&format!("{name}.key")),
            "-out",
            &self.path(&format!("{name}.crt")),
        ]);
    }

    fn signed(&self, name: &str, extensions: &str) {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext, extensions).expect("write extensions");
        let csr = self.path(&format!("{name}.csr"));
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &self.path(&format!("{name}.key")),
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.path("ca.crt"),
            "-CAkey",
            &self.path("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.to_string_lossy(),
            "-out",
            &self.path(&format!("{name}.crt")),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Certs {
    /// `redis-server` arguments for a TLS port with the server certificate, not asking
    /// clients for one.
    pub fn server_args(&self, tls_port: u16) -> Vec<String> {
        [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &self.path("server.crt"),
            "--tls-key-file",
            &self.path("server.key"),
            "--tls-ca-cert-file",
            &self.path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}
