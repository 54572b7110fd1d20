//! Assembles and runs the controller: store, registry, TLS listener, the gRPC services
//! (agent channel, operator API, health, reflection v1 and v1alpha) behind the authz layer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sentinel_proto::v1::enroll_service_server::EnrollServiceServer;
use sentinel_proto::v1::fleet_service_server::FleetServiceServer;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::api::{agent::AgentApi, agent_server::AgentServer, fleet::FleetApi};
use crate::authz::AuthzLayer;
use crate::config::{ControllerConfig, PkiConfig};
use crate::context::Context as Shared;
use crate::enroll::{EnrollApi, Enrolment};
use crate::jobs::{JobQueue, Signer};
use crate::pipeline::Pipeline;
use crate::registry::{Liveness, Registry};
use crate::store::{embedded::EmbeddedStore, Store};

/// How often jobs past their window are timed out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often release bundles that no open job needs are removed from the data directory.
const BUNDLE_PRUNE_INTERVAL: Duration = Duration::from_secs(300);
/// How long a bundle just built may wait for its job to be submitted before it can be pruned.
const BUNDLE_GRACE: Duration = Duration::from_secs(600);

/// Runs the controller until `shutdown` is cancelled. `ready` receives the bound address once
/// the listener is up (used by `sentinel dev` and tests that listen on port 0).
pub async fn run(
    config: ControllerConfig,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    // First: until the handler exists, SIGHUP's default action ends the process.
    let hangups = crate::reload::hangups().context("installing the SIGHUP (reload) handler")?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(&config.store_path())
            .with_context(|| format!("opening the store {}", config.store_path().display()))?,
    );
    let registry = Registry::load(
        store.as_ref(),
        Liveness {
            heartbeat_interval: config.agents.heartbeat_interval,
            missed_heartbeats_offline: config.agents.missed_heartbeats_offline,
        },
    )
    .context("loading hosts from the store")?;
    let signer = match &config.signing {
        Some(s) => {
            let signer = Signer::load(&s.key)
                .with_context(|| format!("loading the job-signing key {}", s.key.display()))?;
            Some(match &s.next_key {
                Some(next) => {
                    let key = crate::pki::keys::load_verifying_key(next).with_context(|| {
                        format!("loading the next job-signing key {}", next.display())
                    })?;
                    info!(next_key = %crate::pki::keys::signing_key_id(&key), "announcing the next job-signing key to agents");
                    signer.with_next(key)
                }
                None => signer,
            })
        }
        None => {
            warn!("no [signing] key configured: jobs cannot be sent");
            None
        }
    };
    let jobs = JobQueue::load(
        store.as_ref(),
        registry.clone(),
        signer,
        config.jobs.run_timeout,
    )
    .context("loading jobs from the store")?;
    let bundles_dir = config.data_dir.join("bundles");
    let pipeline = Pipeline::load(
        store.as_ref(),
        &config.apps,
        config.pipeline.clone(),
        jobs.clone(),
        bundles_dir.clone(),
        config.jobs.ttl,
    )
    .context("loading the deploy history from the store")?;
    crate::metrics::get().init_deploys(config.apps.iter().map(|a| a.name.as_str()));
    // Backups: schedules, job results, and the pre-production backup of db_change deploys.
    let backups = match config.backups.clone() {
        Some(b) => Some(
            crate::backups::Backups::load(b, jobs.clone(), store.clone())
                .context("loading backup state from the store")?,
        ),
        None => None,
    };
    if let Some(backups) = &backups {
        pipeline.set_backups(backups.clone());
    }
    let locks =
        crate::audit::Locks::load(store.clone()).context("loading app locks from the store")?;
    pipeline.set_locks(locks.clone());
    let enrolment = match &config.pki {
        Some(pki) => Some(Arc::new(
            enrolment(&config, pki, store.clone()).context("loading the issuing CA of [pki]")?,
        )),
        None => None,
    };
    let deny = crate::revocation::DenyList::load(store.clone())
        .context("loading the deny list from the store")?;
    let ctx = Arc::new(Shared {
        enrolment: enrolment.clone(),
        registry: registry.clone(),
        jobs: jobs.clone(),
        pipeline,
        bundles_dir,
        backups: backups.clone(),
        audit: Arc::new(crate::audit::AuditLog::new(store.clone())),
        locks,
        deny: deny.clone(),
        store: store.clone(),
    });
    // Database isolation: deploys consult its latest report, and check again before production.
    let isolation = config.isolation.clone().map(|policy| {
        let prober = crate::isolation::Prober::new(jobs.clone(), registry.clone());
        crate::isolation::IsolationState::new(policy, Some(prober))
    });
    if let Some(isolation) = &isolation {
        ctx.pipeline.set_gate(isolation.clone());
    }
    let issuer_der = enrolment
        .as_ref()
        .map(|e| rustls::pki_types::CertificateDer::from(e.issuer().cert_der().to_vec()));
    let tls = crate::tls::ServerTls::new(
        crate::tls::server_config(&config.tls, issuer_der.clone())
            .context("loading the controller's TLS files")?,
    );
    if let Some((not_before, not_after)) =
        sentinel_daemon::tls::load_certs(&config.tls.cert, "certificate")
            .ok()
            .and_then(|certs| {
                certs
                    .first()
                    .and_then(|c| crate::identity::validity(c.as_ref()))
            })
    {
        crate::metrics::get().set_controller_cert(not_before, not_after);
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    info!(listen = %local, store = %config.store_path().display(), "controller listening (mTLS, gRPC)");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServer<AgentApi>>().await;
    health_reporter
        .set_serving::<FleetServiceServer<FleetApi>>()
        .await;
    health_reporter
        .set_serving::<EnrollServiceServer<EnrollApi>>()
        .await;
    let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building reflection v1alpha")?;

    tokio::spawn(
        jobs.clone()
            .run_retention(store.clone(), config.jobs.keep_finished, shutdown.clone())
            .instrument(tracing::info_span!("job_retention")),
    );
    tokio::spawn(
        prune_bundles(ctx.clone(), shutdown.clone())
            .instrument(tracing::info_span!("bundle_prune")),
    );
    let flusher = tokio::spawn(
        flush_loop(
            ctx.clone(),
            store.clone(),
            config.store.flush_interval,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("store_flush")),
    );
    if let Some(backups) = &backups {
        backups.start(shutdown.clone());
    }
    if let Some(isolation) = &isolation {
        tokio::spawn(
            isolation
                .clone()
                .run_schedule(shutdown.clone())
                .instrument(tracing::info_span!("isolation")),
        );
    }

    tokio::spawn(
        crate::reload::run(
            hangups,
            crate::reload::Reloadable {
                pipeline: ctx.pipeline.clone(),
                isolation: isolation.clone(),
                backups: backups.clone(),
                tls: tls.clone(),
                issuer_der,
            },
            config.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("reload")),
    );
    let incoming = crate::tls::incoming(listener, tls, shutdown.clone());
    crate::metrics::start(&config.metrics, registry.clone(), shutdown.clone()).await;
    if let Some(ready) = ready {
        let _ = ready.send(local);
    }
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(AuthzLayer::new(deny.clone(), ctx.audit.clone()))
        .add_service(AgentServer::new(AgentApi::new(
            ctx.clone(),
            shutdown.clone(),
        )))
        .add_service(FleetServiceServer::new(
            FleetApi::new(ctx.clone()).with_isolation(isolation.clone()),
        ))
        .add_service(EnrollServiceServer::new(EnrollApi::new(enrolment)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .context("serving gRPC")?;
    info!("controller stopped serving; flushing state");
    let _ = flusher.await;
    Ok(())
}

/// Enrolment from `[pki]`: the issuing CA (checked against the fleet CA), the store of join
/// tokens, and what new agents are told to trust (the fleet CA, the signing public key).
fn enrolment(
    config: &ControllerConfig,
    pki: &PkiConfig,
    store: Arc<dyn Store>,
) -> anyhow::Result<Enrolment> {
    let issuer = crate::pki::issuer::HostIssuer::load(
        &pki.issuer_cert,
        &pki.issuer_key,
        &config.tls.ca,
        pki.host_cert_ttl,
    )?;
    let ca_pem = std::fs::read_to_string(&config.tls.ca)
        .with_context(|| format!("reading {}", config.tls.ca.display()))?;
    let ca_der = sentinel_daemon::tls::load_certs(&config.tls.ca, "CA certificate")?.remove(0);
    let signing_keys = match &config.signing {
        Some(s) => vec![crate::pki::public_key_pem(&crate::pki::load_signing_key(
            &s.key,
        )?)?],
        None => Vec::new(),
    };
    Ok(Enrolment::new(
        issuer,
        store,
        ca_pem,
        ca_der.as_ref(),
        signing_keys,
    ))
}

/// Reflection over every service we serve. Both reflection versions know each other's
/// descriptors, so `grpcurl list` shows the same services whichever version it speaks.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sentinel_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Removes release bundles (they hold secrets) once no open job needs them: at start, then
/// every [`BUNDLE_PRUNE_INTERVAL`], until `shutdown`.
async fn prune_bundles(ctx: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(BUNDLE_PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let needed = ctx.jobs.open_bundles();
        let dir = ctx.bundles_dir.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            crate::pipeline::bundle::prune(&dir, &needed, BUNDLE_GRACE)
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(bundles = n, "removed release bundles no open job needs"),
            Ok(Err(e)) => {
                warn!(dir = %ctx.bundles_dir.display(), error = %e, "could not prune release bundles (they hold secrets)")
            }
            Err(e) => warn!(error = %e, "the bundle-pruning task failed"),
        }
    }
}

/// Saves what changed once an `interval` (`[store] flush_interval`), and at once when a writer
/// waits on the commit barrier (writes arriving during a flush are grouped into the next one).
async fn flush_loop(
    ctx: Arc<Shared>,
    store: Arc<dyn Store>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let commits = ctx.jobs.commits().clone();
    commits.serve();
    let mut flush_tick = tokio::time::interval(interval);
    let mut sweep_tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        let stopping = tokio::select! {
            _ = sweep_tick.tick() => {
                ctx.jobs.sweep();
                refresh_deny_list(&ctx).await;
                continue;
            }
            _ = flush_tick.tick() => false,
            _ = commits.requested() => false,
            _ = shutdown.cancelled() => true,
        };
        let upto = commits.pending();
        if flush(&ctx, &store).await {
            commits.saved(upto);
        }
        if stopping {
            return;
        }
    }
}

/// Re-reads the deny list (another controller sharing the store may have revoked someone)
/// and closes the streams of hosts revoked there.
async fn refresh_deny_list(ctx: &Arc<Shared>) {
    let deny = ctx.deny.clone();
    match tokio::task::spawn_blocking(move || deny.refresh()).await {
        Ok(Ok(())) => {
            for entry in ctx.deny.list() {
                if entry.kind() == sentinel_proto::v1::RevocationKind::Host {
                    ctx.registry.close(&entry.name);
                }
            }
        }
        Ok(Err(e)) => warn!(error = %e, "could not re-read the deny list"),
        Err(e) => warn!(error = %e, "the deny-list task failed"),
    }
}

/// Writes what changed since the last flush; on failure, puts it back for the next one.
/// Returns whether everything taken was saved.
async fn flush(ctx: &Arc<Shared>, store: &Arc<dyn Store>) -> bool {
    let hosts = ctx.registry.take_dirty();
    let jobs = ctx.jobs.take_dirty();
    let deploys = ctx.pipeline.take_dirty();
    if hosts.is_empty() && jobs.is_empty() && deploys.is_empty() {
        return true;
    }
    let store = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let saved_hosts = if hosts.is_empty() {
            Ok(())
        } else {
            store.save_encoded_hosts(&hosts)
        };
        let saved_jobs = if jobs.is_empty() {
            Ok(())
        } else {
            store.save_jobs(&jobs)
        };
        let saved_deploys = if deploys.is_empty() {
            Ok(())
        } else {
            store.save_deploys(&deploys)
        };
        (hosts, saved_hosts, jobs, saved_jobs, deploys, saved_deploys)
    })
    .await;
    match result {
        Ok((hosts, saved_hosts, jobs, saved_jobs, deploys, saved_deploys)) => {
            let mut all = true;
            if let Err(e) = saved_deploys {
                warn!(error = %e, "saving deploys failed; will retry");
                ctx.pipeline.requeue(&deploys);
                all = false;
            }
            if let Err(e) = saved_hosts {
                warn!(error = %e, "saving host state failed; will retry");
                ctx.registry.requeue(&hosts);
                all = false;
            }
            if let Err(e) = saved_jobs {
                warn!(error = %e, "saving jobs failed; will retry");
                ctx.jobs.requeue(&jobs);
                all = false;
            }
            all
        }
        Err(e) => {
            // The records taken are lost to this flush; the next write marks them again, and
            // writers waiting on the barrier are told their write may not be kept.
            warn!(error = %e, "store task failed");
            false
        }
    }
}
