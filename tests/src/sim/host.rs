//! A synthetic host: what the real agent's collectors would report for a docker-compose host
//! with a few dozen containers, changing the way a real one does. The system section changes
//! on every collection (CPU, load, memory, uptime); the Docker section changes when Docker's
//! own status text changes ("Up 3 hours" becomes "Up 4 hours", following Docker's
//! `HumanDuration`), and when a container restarts (about once a day per host). Containers were
//! started between an hour and half a year ago (log-uniform), so some tick every hour, most
//! every day or week, like a fleet that is deployed to now and then.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sentinel_proto::time::timestamp;
use sentinel_proto::v1::{
    docker_section, system_section, Collection, Container, Disk, DockerSection, DockerState,
    HostInfo, HostState, Port, SystemSection, SystemState,
};
use sha2::{Digest, Sha256};

/// Average container restarts per host per day.
const RESTARTS_PER_DAY: f64 = 1.0;
/// Services a compose project is made of; each host runs a few projects.
const SERVICES: &[(&str, Option<u16>)] = &[
    ("web", Some(80)),
    ("api", Some(8080)),
    ("worker", None),
    ("scheduler", None),
    ("db", Some(5432)),
    ("redis", Some(6379)),
    ("nginx", Some(443)),
    ("metrics", Some(9100)),
    ("backup", None),
    ("mailer", Some(25)),
];
const PROJECTS: &[&str] = &[
    "shop", "billing", "crm", "blog", "auth", "search", "media", "reports", "chat", "wiki",
];

struct SimContainer {
    /// Everything that does not move, prebuilt.
    base: Container,
    started: SystemTime,
    healthcheck: bool,
    /// Exited containers: when they stopped.
    finished: Option<SystemTime>,
}

/// One simulated host.
pub struct SimHost {
    name: String,
    rng: StdRng,
    containers: Vec<SimContainer>,
    boot: SystemTime,
    cpu_count: u32,
    memory_total: u64,
    memory_used: u64,
    cpu: f32,
    load: f64,
    disks: Vec<Disk>,
    last_collection: Option<SystemTime>,
}

impl SimHost {
    /// Host number `index` called `name`, with `containers` containers. The layout is
    /// deterministic per index; the noise is not.
    pub fn new(index: usize, name: &str, containers: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(index as u64 ^ 0x5eed_f1ee7);
        let now = SystemTime::now();
        let mut list = Vec::with_capacity(containers);
        let mut project = 0usize;
        let mut counts: HashMap<(usize, usize), u32> = HashMap::new();
        for i in 0..containers {
            // A new project every 4-8 containers.
            if i > 0 && rng.gen_ratio(1, 6) {
                project += 1;
            }
            let project_name = PROJECTS[(index + project) % PROJECTS.len()];
            let service_index = rng.gen_range(0..SERVICES.len());
            let (service, port) = SERVICES[service_index];
            let replica = counts.entry((project, service_index)).or_insert(0);
            *replica += 1;
            let replica = *replica;
            let name = format!("{project_name}-{service}-{replica}");
            let id = hex::encode(Sha256::digest(format!("{index}/{name}")));
            let image_id = format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{project_name}/{service}")))
            );
            // Log-uniform between 1 hour and ~180 days.
            let age_hours = (rng.gen_range(0.0f64..(24.0f64 * 180.0).ln())).exp();
            let started = now - Duration::from_secs_f64(age_hours * 3600.0);
            let created = started - Duration::from_secs(rng.gen_range(5..600));
            let exited = rng.gen_ratio(1, 20);
            let ports = port.map_or_else(Vec::new, |p| {
                let published = matches!(service, "web" | "nginx" | "api");
                vec![Port {
                    private_port: u32::from(p),
                    public_port: if published {
                        u32::from(p) + 8000 + replica
                    } else {
                        0
                    },
                    ip: if published {
                        "0.0.0.0".into()
                    } else {
                        String::new()
                    },
                    protocol: "tcp".into(),
                }]
            });
            list.push(SimContainer {
                base: Container {
                    id,
                    name,
                    image: format!(
                        "registry.internal:5000/{project_name}/{service}:1.{}.{}",
                        rng.gen_range(0..40),
                        rng.gen_range(0..10)
                    ),
                    image_id,
                    compose_project: project_name.into(),
                    compose_service: service.into(),
                    state: if exited { "exited" } else { "running" }.into(),
                    restart_count: if rng.gen_ratio(1, 10) {
                        rng.gen_range(1..5)
                    } else {
                        0
                    },
                    ports,
                    created: Some(timestamp(created)),
                    ..Default::default()
                },
                started,
                healthcheck: !exited && rng.gen_bool(0.5),
                // Stopped somewhere between its start and now.
                finished: exited.then(|| {
                    started + Duration::from_secs_f64(age_hours * 3600.0 * rng.gen_range(0.1..0.9))
                }),
            });
        }
        list.sort_by(|a, b| a.base.name.cmp(&b.base.name));
        Self {
            name: name.to_owned(),
            containers: list,
            boot: now - Duration::from_secs(rng.gen_range(86_400..86_400 * 200)),
            cpu_count: [2, 4, 8, 16][rng.gen_range(0..4)],
            memory_total: [4u64, 8, 16, 32][rng.gen_range(0..4)] << 30,
            memory_used: 0,
            cpu: rng.gen_range(2.0..30.0),
            load: rng.gen_range(0.1..2.0),
            disks: vec![
                Disk {
                    mount_point: "/".into(),
                    device: "/dev/sda1".into(),
                    file_system: "ext4".into(),
                    total_bytes: 100 << 30,
                    available_bytes: rng.gen_range(20u64..80) << 30,
                },
                Disk {
                    mount_point: "/var/lib/docker".into(),
                    device: "/dev/sdb1".into(),
                    file_system: "xfs".into(),
                    total_bytes: 500 << 30,
                    available_bytes: rng.gen_range(100u64..400) << 30,
                },
            ],
            last_collection: None,
            rng,
        }
    }

    /// The hello's host info.
    pub fn info(&self) -> HostInfo {
        HostInfo {
            name: self.name.clone(),
            agent_version: hostagent::VERSION.into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.1.0-28-amd64".into(),
            arch: "x86_64".into(),
            capabilities: vec!["collector.system".into(), "collector.docker".into()],
            labels: [("role".to_string(), "sim".to_string())].into(),
        }
    }

    /// One collection: a full state as the agent's collectors would return it now.
    pub fn collect(&mut self) -> HostState {
        let now = SystemTime::now();
        let since_last = self
            .last_collection
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        self.last_collection = Some(now);
        let restart_chance = (since_last.as_secs_f64() / 86_400.0 * RESTARTS_PER_DAY).min(1.0);
        if self.rng.gen_bool(restart_chance) {
            let i = self.rng.gen_range(0..self.containers.len().max(1));
            if let Some(c) = self.containers.get_mut(i) {
                if c.finished.is_none() {
                    c.base.restart_count += 1;
                    c.started = now;
                }
            }
        }
        self.walk();
        HostState {
            system: Some(SystemSection {
                collection: Some(collection(now, self.rng.gen_range(300..2_000))),
                result: Some(system_section::Result::State(self.system(now))),
            }),
            docker: Some(DockerSection {
                collection: Some(collection(now, self.rng.gen_range(5_000..40_000))),
                result: Some(docker_section::Result::State(DockerState {
                    engine_version: "24.0.7".into(),
                    containers: self.containers.iter().map(|c| c.at(now)).collect(),
                })),
            }),
            ..Default::default()
        }
    }

    /// Moves the system figures a little, like a real host between two collections.
    fn walk(&mut self) {
        self.cpu = (self.cpu + self.rng.gen_range(-3.0..3.0)).clamp(0.5, 95.0);
        self.load = (self.load + self.rng.gen_range(-0.2..0.2)).clamp(0.0, 16.0);
        let used = self.memory_total / 3 + self.rng.gen_range(0..self.memory_total / 4);
        self.memory_used = used;
        if let Some(disk) = self.disks.first_mut() {
            disk.available_bytes = disk
                .available_bytes
                .saturating_sub(self.rng.gen_range(0..1 << 20));
        }
    }

    fn system(&self, now: SystemTime) -> SystemState {
        SystemState {
            hostname: self.name.clone(),
            cpu_count: self.cpu_count,
            cpu_usage_percent: self.cpu,
            load1: self.load,
            load5: self.load * 0.9,
            load15: self.load * 0.8,
            memory_total_bytes: self.memory_total,
            memory_used_bytes: self.memory_used,
            memory_available_bytes: self.memory_total - self.memory_used,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
            uptime_seconds: now.duration_since(self.boot).unwrap_or_default().as_secs(),
            boot_time: Some(timestamp(self.boot)),
            disks: self.disks.clone(),
        }
    }
}

impl SimContainer {
    fn at(&self, now: SystemTime) -> Container {
        let mut c = self.base.clone();
        c.started_at = Some(timestamp(self.started));
        match self.finished {
            Some(finished) => {
                c.status = format!(
                    "Exited (0) {} ago",
                    human_duration(now.duration_since(finished).unwrap_or_default())
                );
                c.health = "none".into();
            }
            None => {
                let up = human_duration(now.duration_since(self.started).unwrap_or_default());
                if self.healthcheck {
                    c.status = format!("Up {up} (healthy)");
                    c.health = "healthy".into();
                } else {
                    c.status = format!("Up {up}");
                    c.health = "none".into();
                }
            }
        }
        c
    }
}

fn collection(at: SystemTime, micros: u64) -> Collection {
    Collection {
        collected_at: Some(timestamp(at)),
        duration_micros: micros,
    }
}

/// Docker's `units.HumanDuration`, which its status texts use.
pub fn human_duration(d: Duration) -> String {
    let seconds = d.as_secs();
    let minutes = seconds / 60;
    let hours = (d.as_secs_f64() / 3600.0 + 0.5) as u64;
    if seconds < 1 {
        "Less than a second".into()
    } else if seconds == 1 {
        "1 second".into()
    } else if seconds < 60 {
        format!("{seconds} seconds")
    } else if minutes == 1 {
        "About a minute".into()
    } else if minutes < 60 {
        format!("{minutes} minutes")
    } else if hours == 1 {
        "About an hour".into()
    } else if hours < 48 {
        format!("{hours} hours")
    } else if hours < 24 * 7 * 2 {
        format!("{} days", hours / 24)
    } else if hours < 24 * 30 * 2 {
        format!("{} weeks", hours / 24 / 7)
    } else if hours < 24 * 365 * 2 {
        format!("{} months", hours / 24 / 30)
    } else {
        format!("{} years", seconds / 3600 / 24 / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_docker() {
        let h = |s: u64| human_duration(Duration::from_secs(s));
        assert_eq!(h(0), "Less than a second");
        assert_eq!(h(30), "30 seconds");
        assert_eq!(h(90), "About a minute");
        assert_eq!(h(3 * 60), "3 minutes");
        assert_eq!(h(3600), "About an hour");
        assert_eq!(h(5 * 3600), "5 hours");
        assert_eq!(h(3 * 86_400), "3 days");
        assert_eq!(h(21 * 86_400), "3 weeks");
        assert_eq!(h(90 * 86_400), "3 months");
    }

    #[test]
    fn a_host_reports_its_containers_and_only_the_system_section_moves_at_once() {
        let mut host = SimHost::new(7, "sim-00007", 30);
        let mut delta = hostagent::collectors::DeltaTracker::default();
        let first = delta.report(host.collect(), true);
        let Some(docker_section::Result::State(docker)) =
            first.docker.as_ref().and_then(|d| d.result.as_ref())
        else {
            panic!("no docker state in {first:?}");
        };
        assert_eq!(docker.containers.len(), 30);
        let second = delta.report(host.collect(), false);
        assert!(second.system.is_some());
        assert!(
            second.docker.is_none(),
            "nothing ticked over within a second"
        );
    }
}
