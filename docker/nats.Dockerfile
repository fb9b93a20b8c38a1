# nats-server with JetStream, from the pinned static binary: nothing pulled.
FROM scratch
COPY target/tools/nats-server-2.15.1/nats-server /nats-server
COPY nats/nats.conf /etc/nats/nats.conf
EXPOSE 4222 8222
ENTRYPOINT ["/nats-server", "-c", "/etc/nats/nats.conf", "-sd", "/data/jetstream"]
