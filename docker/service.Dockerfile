# A Headroom service: one statically linked binary in an empty root.
FROM scratch
ARG BIN
COPY target/x86_64-unknown-linux-gnu/release/${BIN} /service
ENTRYPOINT ["/service"]
