//! The benchmark's hands on the nodes of a `cairn dev` cluster it started: each node's PID (the
//! `pid` file `cairn dev` writes in DIR/KIND-N/), SIGKILL, and a restart with the same command
//! line (children of the benchmark from then on, killed when it ends).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub struct NodeProcs {
    cluster_dir: PathBuf,
    /// "master" or "chunkserver".
    kind: &'static str,
    /// Nodes this benchmark restarted: id -> its child.
    restarted: BTreeMap<u64, std::process::Child>,
}

impl Drop for NodeProcs {
    fn drop(&mut self) {
        for c in self.restarted.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl NodeProcs {
    pub fn new(cluster_dir: PathBuf, kind: &'static str) -> NodeProcs {
        NodeProcs { cluster_dir, kind, restarted: BTreeMap::new() }
    }

    pub fn pid(&self, id: u64) -> Result<u32> {
        if let Some(c) = self.restarted.get(&id) {
            return Ok(c.id());
        }
        let f = self.cluster_dir.join(format!("{}-{id}/pid", self.kind));
        let s = std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
        Ok(s.trim().parse()?)
    }

    /// SIGKILL to node `id`; returns its command line, to start it again.
    pub fn kill(&mut self, id: u64) -> Result<Vec<String>> {
        let pid = self.pid(id)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("{} {id} (pid {pid}) is not running", self.kind))?;
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
        if let Some(mut c) = self.restarted.remove(&id) {
            let _ = c.wait();
        }
        Ok(args)
    }

    /// Starts a killed node again with the same arguments (retrying while its port is held).
    pub fn restart(&mut self, id: u64, args: &[String]) -> Result<Instant> {
        let log = self.cluster_dir.join(format!("logs/{}-{id}.bench.log", self.kind));
        let start = Instant::now();
        loop {
            let err = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
            let mut child = std::process::Command::new(&args[0])
                .args(&args[1..])
                .stdout(std::process::Stdio::null())
                .stderr(err)
                .stdin(std::process::Stdio::null())
                .spawn()
                .with_context(|| format!("restart {} {id}", self.kind))?;
            std::thread::sleep(Duration::from_millis(100));
            if child.try_wait()?.is_none() {
                self.restarted.insert(id, child);
                return Ok(start);
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "{} {id} did not restart; see {}",
                self.kind,
                log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
