//! The nginx and Redis collectors end to end: a real agent with both enabled reports a real
//! nginx and real Redis instances, and the operator reads them with grpcurl's `GetHost`.

use sentinel_e2e::services::{nginx_binary, Nginx, RedisServer};
use sentinel_e2e::{eventually, Fleet, Value};

const REDIS_PASSWORD: &str = "e2e-Redis-Pw-7";

fn section<'a>(host: &'a Value, name: &str) -> &'a Value {
    &host["state"][name]["state"]
}

#[test]
fn an_agent_reports_nginx_and_redis_through_get_host() {
    let redis = RedisServer::start(Some(REDIS_PASSWORD));
    redis.cli(&["SET", "greeting", "hello"]);
    let mut gone = RedisServer::start(None);
    let gone_url = gone.url.clone();
    gone.stop();

    let mut nginx = Nginx::new();
    let (nginx_config, [port]) = nginx.start(|nginx, [port]| {
        nginx.write(
            "conf/nginx.conf",
            &nginx.main_config(&format!(
                "    upstream shop_app {{ server 127.0.0.1:9001; }}\n\
                 \x20   server {{\n\
                 \x20       listen 127.0.0.1:{port};\n\
                 \x20       server_name shop.example.test;\n\
                 \x20       location / {{ proxy_pass http://shop_app; }}\n\
                 \x20   }}\n"
            )),
        )
    });

    let fleet = Fleet::new(&["hub-alfa"]);
    let password_file = fleet.path("redis-password");
    std::fs::write(&password_file, REDIS_PASSWORD).unwrap();
    let controller = fleet.start_controller("");
    let extra = format!(
        "[collectors]\n\
         docker = false\n\n\
         [collectors.nginx]\n\
         enabled = true\n\
         binary = \"{binary}\"\n\
         config = \"{config}\"\n\
         prefix = \"{prefix}\"\n\n\
         [[collectors.redis]]\n\
         name = \"cache\"\n\
         url = \"{url}\"\n\
         password_file = \"{password_file}\"\n\n\
         [[collectors.redis]]\n\
         name = \"gone\"\n\
         url = \"{gone_url}\"\n",
        binary = nginx_binary().display(),
        config = nginx_config.display(),
        prefix = nginx.prefix().display(),
        url = redis.url,
        password_file = password_file.display(),
    );
    let _agent = fleet.start_agent("hub-alfa", "hub-alfa", &controller.addr, &extra);

    let host = eventually("nginx and redis sections in GetHost", || {
        let host = controller.wait_online("hub-alfa");
        if section(&host, "nginx").is_object() && section(&host, "redis").is_object() {
            Ok(host)
        } else {
            Err(host.to_string())
        }
    });
    assert!(
        !host.to_string().contains(REDIS_PASSWORD),
        "the password leaked into GetHost: {host}"
    );
    let capabilities = host["info"]["capabilities"].as_array().unwrap();
    for capability in ["collector.nginx", "collector.redis"] {
        assert!(capabilities.iter().any(|c| c == capability), "{host}");
    }

    let nginx_state = section(&host, "nginx");
    assert_eq!(nginx_state["running"], true, "{nginx_state}");
    assert_eq!(nginx_state["configOk"], true, "{nginx_state}");
    assert!(nginx_state["version"]
        .as_str()
        .is_some_and(|v| v.starts_with("nginx/")));
    let server = &nginx_state["servers"][0];
    assert_eq!(
        server["serverNames"][0], "shop.example.test",
        "{nginx_state}"
    );
    assert_eq!(server["listen"][0], format!("127.0.0.1:{port}"));
    assert_eq!(server["routes"][0]["proxyPass"], "http://shop_app");
    assert_eq!(server["routes"][0]["upstreamServers"][0], "127.0.0.1:9001");

    let instances = section(&host, "redis")["instances"].as_array().unwrap();
    let cache = &instances[0];
    assert_eq!(cache["name"], "cache");
    assert_eq!(cache["address"], redis.url.as_str());
    assert_eq!(cache["reachable"], true, "{cache}");
    assert_eq!(cache["role"], "master");
    // uint64 values are strings in protobuf's JSON.
    assert_eq!(cache["keyspaceKeys"]["db0"], "1", "{cache}");
    let gone = &instances[1];
    assert_eq!(gone["name"], "gone");
    assert_ne!(gone["reachable"], true);
    assert!(
        gone["error"]
            .as_str()
            .is_some_and(|e| e.starts_with(&format!("{gone_url}: cannot connect"))),
        "{gone}"
    );
    let list = controller
        .grpcurl(None, "sentinel.v1.FleetService/ListHosts")
        .json()
        .unwrap();
    // One unreachable instance ("gone") makes the redis collector failing, so its alert fires
    // (issue 13: it used to show only under the collector errors).
    assert_eq!(
        list["hosts"][0]["failingCollectors"],
        serde_json::json!(["redis"]),
        "{list}"
    );

    // Changes travel as delta reports.
    nginx.stop();
    eventually("nginx reported stopped", || {
        let host = controller.get_host("hub-alfa")?;
        let running = &section(&host, "nginx")["running"];
        if running.is_null() || running == false {
            Ok(())
        } else {
            Err(host.to_string())
        }
    });
}
