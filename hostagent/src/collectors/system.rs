//! The system collector: CPU, memory, swap, load, uptime and disks of the host, read with
//! `sysinfo`.
//!
//! It keeps one `sysinfo::System` and one `sysinfo::Disks` between runs, so the CPU usage it
//! reports is the usage since the previous collection, and it refreshes only what it reports:
//! processes are never listed, which keeps the agent's memory small.
//!
//! Disks are filtered down to real storage: pseudo and in-memory file systems (tmpfs, overlay,
//! squashfs, ...) and the mounts container runtimes create under their state directories are
//! skipped, and a device mounted at several places (bind mounts) is reported once, at its
//! shortest mount point.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use sentinel_proto::v1::{Disk, SystemState};
use sysinfo::{DiskRefreshKind, Disks, System};

use super::CollectorError;

/// File systems that never hold user data worth reporting: kernel pseudo file systems, memory
/// backed ones, read-only images and union mounts of container runtimes.
const NOISE_FILE_SYSTEMS: &[&str] = &[
    "aufs",
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fuse.gvfsd-fuse",
    "fuse.lxcfs",
    "fuse.portal",
    "fuse.snapfuse",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Mount point prefixes owned by container runtimes and the system, whose mounts are never
/// disks of their own (the directories themselves, e.g. a dedicated `/var/lib/docker`
/// volume, are kept). sysinfo itself already skips `/proc`, `/sys` and `/run` (but not
/// `/run/media`, where removable media appear).
const NOISE_MOUNT_PREFIXES: &[&str] = &[
    "/var/lib/docker/",
    "/var/lib/containers/",
    "/var/lib/containerd/",
    "/var/lib/kubelet/",
    "/snap/",
    "/dev/",
];

/// Collects CPU, memory, swap, load, uptime and disks with sysinfo, refreshing only what it
/// reports.
pub struct SystemCollector {
    /// CPU and memory state; kept so CPU usage is a delta between collections. `None` only if
    /// sysinfo could not be initialised (retried on every collection).
    system: Option<System>,
    /// The disk list, kept so known disks are refreshed in place.
    disks: Option<Disks>,
}

impl SystemCollector {
    /// Creates the collector. Cheap: it reads the CPU counters once (so the first collection
    /// already reports a usage delta) and nothing else.
    pub fn new() -> Self {
        let system = System::new().ok().map(|mut system| {
            system.refresh_cpu_usage();
            system
        });
        Self {
            system,
            disks: Disks::new().ok(),
        }
    }

    /// Reads the current state of the host.
    ///
    /// The CPU usage is the average since the previous collection (or since the collector was
    /// created). Individual readings that the platform cannot provide (load, uptime, host name)
    /// are left at zero or empty; only a sysinfo that cannot be initialised at all is an error.
    pub fn collect(&mut self) -> Result<SystemState, CollectorError> {
        let system = match &mut self.system {
            Some(system) => system,
            None => self.system.insert(System::new().map_err(|e| failed(&e))?),
        };
        system.refresh_cpu_usage();
        system.refresh_memory();

        let usage = system.global_cpu_usage();
        let cpu_usage_percent = if usage.is_finite() {
            usage.clamp(0.0, 100.0)
        } else {
            0.0
        };
        let cpu_count = match system.cpus().len() {
            0 => std::thread::available_parallelism().map_or(0, |n| n.get()),
            n => n,
        };

        let hostname = System::host_name().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the host name");
            String::new()
        });
        let (load1, load5, load15) = match System::load_average() {
            Ok(load) => (load.one, load.five, load.fifteen),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the load average");
                (0.0, 0.0, 0.0)
            }
        };
        let uptime_seconds = System::uptime().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the uptime");
            0
        });
        let boot_time = match System::boot_time() {
            Ok(secs) if secs > 0 => Some(sentinel_proto::time::timestamp(
                UNIX_EPOCH + Duration::from_secs(secs),
            )),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the boot time");
                None
            }
        };

        Ok(SystemState {
            hostname,
            cpu_count: u32::try_from(cpu_count).unwrap_or(u32::MAX),
            cpu_usage_percent,
            load1,
            load5,
            load15,
            memory_total_bytes: system.total_memory(),
            memory_used_bytes: system.used_memory(),
            memory_available_bytes: system.available_memory(),
            swap_total_bytes: system.total_swap(),
            swap_used_bytes: system.used_swap(),
            uptime_seconds,
            boot_time,
            disks: self.collect_disks(),
        })
    }

    /// Refreshes the mount list and the space of every mount, and returns the real disks.
    fn collect_disks(&mut self) -> Vec<Disk> {
        let disks = match &mut self.disks {
            Some(disks) => disks,
            None => match Disks::new() {
                Ok(disks) => self.disks.insert(disks),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list disks");
                    return Vec::new();
                }
            },
        };
        // Only the space: no I/O counters (another file read) and no disk kind (sysfs walks).
        disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
        real_disks(disks.iter().map(|disk| Disk {
            mount_point: disk.mount_point().to_string_lossy().into_owned(),
            device: disk.name().to_string_lossy().into_owned(),
            file_system: disk.file_system().to_string_lossy().into_owned(),
            total_bytes: disk.total_space(),
            available_bytes: disk.available_space(),
        }))
    }
}

impl Default for SystemCollector {
    fn default() -> Self {
        Self::new()
    }
}

fn failed(error: &dyn std::fmt::Display) -> CollectorError {
    CollectorError::Failed {
        what: "system".to_owned(),
        message: format!("cannot read system information: {error}"),
    }
}

/// Whether a mount is noise rather than a disk.
fn is_noise(disk: &Disk) -> bool {
    disk.total_bytes == 0
        || NOISE_FILE_SYSTEMS.contains(&disk.file_system.as_str())
        || NOISE_MOUNT_PREFIXES
            .iter()
            .any(|prefix| disk.mount_point.starts_with(prefix))
}

/// Drops the noise, reports each block device once (at its shortest mount point, as `df`
/// does for bind mounts) and sorts by mount point.
fn real_disks(mounts: impl IntoIterator<Item = Disk>) -> Vec<Disk> {
    let mut by_device: HashMap<String, Disk> = HashMap::new();
    let mut others = Vec::new();
    for disk in mounts.into_iter().filter(|disk| !is_noise(disk)) {
        // Only paths name a device; ZFS datasets and the like share a name only by accident.
        if !disk.device.starts_with('/') {
            others.push(disk);
            continue;
        }
        match by_device.get_mut(&disk.device) {
            Some(kept) if shorter(&kept.mount_point, &disk.mount_point) => {}
            Some(kept) => *kept = disk,
            None => {
                by_device.insert(disk.device.clone(), disk);
            }
        }
    }
    let mut disks: Vec<Disk> = by_device.into_values().chain(others).collect();
    disks.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    disks
}

/// Whether mount point `a` is preferred over `b` (shorter, then lexically first).
fn shorter(a: &str, b: &str) -> bool {
    (a.len(), a) <= (b.len(), b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(mount_point: &str, device: &str, file_system: &str) -> Disk {
        Disk {
            mount_point: mount_point.to_owned(),
            device: device.to_owned(),
            file_system: file_system.to_owned(),
            total_bytes: 100,
            available_bytes: 50,
        }
    }

    #[test]
    fn collects_sane_values() {
        let mut collector = SystemCollector::new();
        let first = match collector.collect() {
            Ok(state) => state,
            Err(e) => panic!("system collection failed: {e}"),
        };
        assert!(first.cpu_count > 0);
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_used_bytes <= first.memory_total_bytes);
        assert!(first.memory_available_bytes <= first.memory_total_bytes);
        assert!(first.swap_used_bytes <= first.swap_total_bytes);
        assert!((0.0..=100.0).contains(&first.cpu_usage_percent));
        assert!(first.load1 >= 0.0 && first.load5 >= 0.0 && first.load15 >= 0.0);
        assert!(first.uptime_seconds > 0);
        assert!(!first.hostname.is_empty());
        let boot = first.boot_time.as_ref().map_or(0, |ts| ts.seconds);
        assert!(boot > 1_000_000_000, "boot time {boot}");

        // Wherever "/" is a real disk, it is reported; a machine always has some disk.
        let root_is_disk = std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
            mounts.lines().any(|line| {
                let mut fields = line.split_whitespace();
                let (device, mount, fs) = (fields.next(), fields.next(), fields.next());
                mount == Some("/")
                    && device.is_some_and(|d| d.starts_with("/dev/"))
                    && !fs.is_some_and(|fs| NOISE_FILE_SYSTEMS.contains(&fs))
            })
        });
        if root_is_disk {
            assert!(
                first.disks.iter().any(|d| d.mount_point == "/"),
                "no disk for /: {:?}",
                first.disks
            );
        }
        for d in &first.disks {
            assert!(
                d.total_bytes > 0 && d.available_bytes <= d.total_bytes,
                "{d:?}"
            );
            assert!(!is_noise(d), "{d:?}");
        }

        // A second run reuses the state and still reports sane values.
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let second = match collector.collect() {
            Ok(state) => state,
            Err(e) => panic!("second system collection failed: {e}"),
        };
        assert_eq!(second.cpu_count, first.cpu_count);
        assert!((0.0..=100.0).contains(&second.cpu_usage_percent));
        assert_eq!(second.disks.len(), first.disks.len());
    }

    #[test]
    fn pseudo_file_systems_and_runtime_mounts_are_skipped() {
        let disks = real_disks([
            disk("/", "/dev/vda1", "ext4"),
            disk("/dev/shm", "tmpfs", "tmpfs"),
            disk("/var/lib/docker", "/dev/vdb", "xfs"),
            disk("/var/lib/docker/overlay2/abc/merged", "overlay", "overlay"),
            disk(
                "/var/lib/docker/containers/x/mounts/secrets",
                "/dev/vdb",
                "xfs",
            ),
            disk("/snap/core/1", "/dev/loop0", "squashfs"),
            disk("/boot/efi", "/dev/vda15", "vfat"),
            disk("/tank", "tank", "zfs"),
            Disk {
                total_bytes: 0,
                ..disk("/empty", "/dev/vdc", "ext4")
            },
        ]);
        let mounts: Vec<&str> = disks.iter().map(|d| d.mount_point.as_str()).collect();
        assert_eq!(mounts, ["/", "/boot/efi", "/tank", "/var/lib/docker"]);
    }

    #[test]
    fn bind_mounts_report_the_device_once() {
        let disks = real_disks([
            disk("/var/lib/docker", "/dev/vda", "ext4"),
            disk("/", "/dev/vda", "ext4"),
            disk("/srv/data", "/dev/vda", "ext4"),
        ]);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].mount_point, "/");
    }
}
