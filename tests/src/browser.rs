//! A headless Chromium driven over WebDriver: a `chromedriver` owned by one test, on a port reserved
//! for it (see `PortHold`), killed with the browsers it started when the fixture is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dualstream_devstack::{start_on_own_port, PortHold};

const INSTALL: &str = "the browser tests need Chromium and its WebDriver on PATH. Debian: \
    `apt-get install -y chromium chromium-driver` (.ci/run does it); elsewhere install Chrome or Chromium and the \
    chromedriver of the same version";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}

/// A `chromedriver` process and the Chromium it drives.
#[derive(Debug)]
pub struct Chromedriver {
    /// The browser binary (`chromium`, else `google-chrome`), for the session's capabilities.
    pub browser: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
    _hold: PortHold,
}

impl Chromedriver {
    /// Start one; panics, saying how to install them, when chromedriver or the browser is missing.
    pub fn start() -> Self {
        let driver = on_path("chromedriver").unwrap_or_else(|| panic!("chromedriver not found: {INSTALL}"));
        let browser = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find_map(on_path)
            .unwrap_or_else(|| panic!("chromium not found: {INSTALL}"));
        let spawn = |port: u16| {
            use std::os::unix::process::CommandExt;
            Command::new(&driver)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: the browsers it starts are killed with it.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", driver.display()))
        };
        let (hold, child) = start_on_own_port("chromedriver", Duration::from_secs(20), spawn);
        Self { browser, port: hold.port, child, _hold: hold }
    }

    /// The WebDriver URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Capabilities for a headless session of [`browser`](Self::browser) with a window of this size
    /// (`--no-sandbox`: tests may run as root, as in CI containers).
    pub fn headless(&self, width: u32, height: u32) -> serde_json::Map<String, serde_json::Value> {
        let args = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--window-size={width},{height}"));
        let options = serde_json::json!({"binary": self.browser, "args": args});
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert("goog:chromeOptions".into(), options);
        caps
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}
