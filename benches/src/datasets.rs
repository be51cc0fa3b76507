//! Seeded generators of log lines for the storage benchmark: the same seed gives the same lines
//! on every machine, so bytes per line compare across runs and commits.
//!
//! The realistic sets draw from the distributions a busy service shows — a few thousand client
//! addresses with a heavy head, a few dozen routes with ids in them, mostly 200s, a handful of
//! user agents — rather than uniform noise (which no compressor can shrink and no service
//! writes) or one line repeated (which any compressor shrinks to nothing).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A data set: its name and a generator of `(nanoseconds since the previous line, line)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataset {
    /// What the core bench's job writes: `yes` repeating one 150-byte line, ~2M lines/s.
    Bench,
    /// Apache combined access log lines (~220 B), a few hundred requests a second.
    Access,
    /// JSON application log lines (~200 B), a few hundred a second.
    Json,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Bench => "bench lines (150 B, yes)",
            Dataset::Access => "Apache access log",
            Dataset::Json => "JSON application log",
        }
    }

    pub fn lines(self, seed: u64) -> Lines {
        Lines {
            dataset: self,
            rng: StdRng::seed_from_u64(seed),
            clock_ns: 1_764_560_467_000_000_000,
            counter: 0,
        }
    }
}

/// An endless stream of one data set's lines with their timestamps.
pub struct Lines {
    dataset: Dataset,
    rng: StdRng,
    clock_ns: i64,
    counter: u64,
}

impl Iterator for Lines {
    type Item = (i64, Vec<u8>);

    fn next(&mut self) -> Option<(i64, Vec<u8>)> {
        self.counter += 1;
        let (gap_ns, line) = match self.dataset {
            Dataset::Bench => (self.rng.random_range(300..700), vec![b'x'; 149]),
            Dataset::Access => (self.rng.random_range(0..6_000_000), self.access()),
            Dataset::Json => (self.rng.random_range(0..6_000_000), self.json()),
        };
        self.clock_ns += gap_ns;
        Some((self.clock_ns, line))
    }
}

const ROUTES: &[&str] = &[
    "/",
    "/index.html",
    "/favicon.ico",
    "/static/css/main.4f2a9c.css",
    "/static/js/app.81be3d.js",
    "/static/img/logo.svg",
    "/api/v1/orders",
    "/api/v1/orders/{id}",
    "/api/v1/orders/{id}/items",
    "/api/v1/users/{id}",
    "/api/v1/users/{id}/preferences",
    "/api/v1/products?page={n}",
    "/api/v1/products/{id}",
    "/api/v1/search?q={word}&page={n}",
    "/api/v1/cart",
    "/api/v1/checkout",
    "/login",
    "/logout",
    "/account/settings",
    "/health",
    "/metrics",
    "/blog/2026/11/{word}-{word}",
    "/docs/{word}/{word}.html",
    "/images/products/{id}.jpg",
];

const WORDS: &[&str] = &[
    "kernel",
    "rust",
    "cgroup",
    "storage",
    "release",
    "scheduler",
    "network",
    "memory",
    "linux",
    "deploy",
    "metrics",
    "backup",
    "search",
    "orders",
    "winter",
    "garden",
    "coffee",
    "bicycle",
    "camera",
    "laptop",
    "jacket",
    "boots",
    "lamp",
    "desk",
    "chair",
    "books",
    "music",
    "travel",
];

const AGENTS: &[&str] = &[
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "curl/8.11.0",
    "Prometheus/3.0.1",
    "Go-http-client/1.1",
    "python-requests/2.32.3",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
];

const REFERERS: &[&str] = &[
    "-",
    "https://www.example.com/",
    "https://www.example.com/products",
    "https://www.google.com/",
    "https://news.example.org/article/4711",
];

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

impl Lines {
    /// An index into `len` items, the first few far more often than the rest.
    fn skewed(&mut self, len: usize) -> usize {
        let r: f64 = self.rng.random();
        ((r * r * r) * len as f64) as usize
    }

    fn fill(&mut self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 16);
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let end = start + rest[start..].find('}').unwrap_or(0);
            match &rest[start + 1..end] {
                "id" => out.push_str(&self.rng.random_range(1..250_000u32).to_string()),
                "n" => out.push_str(&self.rng.random_range(1..40u32).to_string()),
                _ => out.push_str(WORDS[self.rng.random_range(0..WORDS.len())]),
            }
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn access(&mut self) -> Vec<u8> {
        let client = self.skewed(3000) as u32;
        let ip = format!(
            "{}.{}.{}.{}",
            [203, 198, 192, 100][(client % 4) as usize],
            (client >> 2) % 256,
            (client * 7) % 256,
            (client * 13 + 1) % 254 + 1
        );
        let route = ROUTES[self.skewed(ROUTES.len())];
        let path = self.fill(route);
        let method = if route.contains("checkout")
            || (route == "/api/v1/orders" && self.rng.random_bool(0.3))
        {
            "POST"
        } else {
            "GET"
        };
        let status = match self.rng.random_range(0..1000) {
            0..=900 => 200,
            901..=940 => 304,
            941..=970 => 404,
            971..=990 => 302,
            991..=997 => 500,
            _ => 503,
        };
        let size = if status == 304 {
            0
        } else {
            self.rng.random_range(120..48_000)
        };
        let referer = REFERERS[self.skewed(REFERERS.len())];
        let agent = AGENTS[self.skewed(AGENTS.len())];
        let secs = self.clock_ns / 1_000_000_000;
        let (day, hh, mm, ss) = (
            (secs / 86_400) % 28 + 1,
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
        );
        let user = if self.rng.random_bool(0.1) {
            "alice"
        } else {
            "-"
        };
        format!(
            "{ip} - {user} [{day:02}/{}/2026:{hh:02}:{mm:02}:{ss:02} +0000] \"{method} {path} HTTP/1.1\" {status} {size} \"{referer}\" \"{agent}\"",
            MONTHS[11]
        )
        .into_bytes()
    }

    fn json(&mut self) -> Vec<u8> {
        const LEVELS: [&str; 4] = ["info", "debug", "warn", "error"];
        const LOGGERS: [&str; 6] = [
            "orders.service",
            "orders.repository",
            "payments.client",
            "http.server",
            "cache.redis",
            "auth.tokens",
        ];
        const MESSAGES: [&str; 8] = [
            "order created",
            "order shipped",
            "payment authorized",
            "request completed",
            "cache miss",
            "token refreshed",
            "retrying upstream call",
            "slow query",
        ];
        let micros = (self.clock_ns / 1000) % 1_000_000;
        let secs = self.clock_ns / 1_000_000_000;
        let (hh, mm, ss) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let level = LEVELS[self.skewed(LEVELS.len())];
        let logger = LOGGERS[self.skewed(LOGGERS.len())];
        let message = MESSAGES[self.skewed(MESSAGES.len())];
        let request_id: u64 = self.rng.random();
        format!(
            "{{\"ts\":\"2026-12-01T{hh:02}:{mm:02}:{ss:02}.{micros:06}Z\",\"level\":\"{level}\",\"logger\":\"{logger}\",\"msg\":\"{message}\",\"request_id\":\"{request_id:016x}\",\"user_id\":{},\"order_id\":{},\"duration_ms\":{:.1},\"status\":{}}}",
            self.rng.random_range(1..60_000u32),
            self.rng.random_range(100_000..999_999u32),
            self.rng.random_range(0.2..900.0f64),
            [200, 201, 204, 400, 404, 500][self.skewed(6)],
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_lines_of_the_promised_size() {
        for dataset in [Dataset::Bench, Dataset::Access, Dataset::Json] {
            let a: Vec<_> = dataset.lines(7).take(1000).collect();
            let b: Vec<_> = dataset.lines(7).take(1000).collect();
            assert_eq!(a, b);
            assert!(a.windows(2).all(|w| w[0].0 <= w[1].0));
            let mean = a.iter().map(|(_, l)| l.len()).sum::<usize>() / a.len();
            assert!((140..=240).contains(&mean), "{dataset:?}: {mean} B");
        }
    }
}
