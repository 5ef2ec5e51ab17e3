//! A PostgreSQL for a test: `CONCH_TEST_DATABASE_URL` when set (a fresh
//! database is made in it per test), else a throwaway cluster started
//! here with Debian's `initdb` and `pg_ctl` (from the postgresql package)
//! in a temporary directory, on a free loopback port, as the `postgres`
//! user when run as root (PostgreSQL refuses to run as root), and stopped
//! and removed when dropped.

use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    /// The URL of this test's database.
    pub url: String,
    cluster: Option<(tempfile::TempDir, PathBuf)>,
}

/// Where Debian puts the server's programs.
fn bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    // By number: 16 after 9.6.
    versions.sort_by_key(|v| {
        v.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .last()
        .map(|v| v.join("bin").join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `cmd` as the postgres user when this process is root.
fn as_postgres(program: PathBuf) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub fn start() -> Postgres {
        let name = format!("conch_test_{}", hex::encode(rand_bytes()));
        if let Ok(base) = std::env::var("CONCH_TEST_DATABASE_URL") {
            create_database(&base, &name);
            let url = match base.rsplit_once('/') {
                Some((server, _)) => format!("{server}/{name}"),
                None => format!("{base}/{name}"),
            };
            return Postgres { url, cluster: None };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("the postgres user (Debian's postgresql package makes it)");
            for p in [dir.path(), data.as_path()] {
                nix::unistd::chown(p, Some(pg.uid), Some(pg.gid)).unwrap();
            }
        }
        let mut initdb = as_postgres(bin("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(initdb, "initdb");
        let port = super::free_port();
        let mut ctl = as_postgres(bin("pg_ctl"));
        ctl.arg("-D")
            .arg(&data)
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.path().display()
            ))
            .arg("start");
        run(ctl, "pg_ctl start");
        // From here on, a panic stops the cluster (Drop).
        let pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/{name}"),
            cluster: Some((dir, data)),
        };
        let base = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        create_database(&base, &name);
        pg
    }
}

fn rand_bytes() -> [u8; 6] {
    let mut b = [0u8; 6];
    rand::fill(&mut b);
    b
}

fn create_database(base: &str, name: &str) {
    let mut psql = Command::new("psql");
    psql.arg(base)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"));
    run(psql, "psql CREATE DATABASE");
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some((_, data)) = &self.cluster {
            let mut ctl = as_postgres(bin("pg_ctl"));
            ctl.arg("-D")
                .arg(data)
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = ctl.output();
        }
    }
}
