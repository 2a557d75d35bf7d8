# switchyard in a container: the package built from this checkout (`npm pack`, which bundles dist/) and
# installed globally the way `npm install -g switchyard-gateway` installs it, on Node 24.
#   docker build -t switchyard .
#   docker run --rm -p 9999:9999 -p 127.0.0.1:7090:7090 -v /etc/switchyard:/etc/switchyard:ro switchyard \
#     server --config /etc/switchyard/server.yaml
FROM node:24-slim AS package
WORKDIR /build
COPY package.json npm-shrinkwrap.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm pack --pack-destination /package

FROM node:24-slim
COPY --from=package /package/ /tmp/package/
RUN npm install --global --no-audit --no-fund /tmp/package/switchyard-gateway-*.tgz \
  && rm -rf /tmp/package \
  && npm cache clean --force
# Inside a container listen on every interface; keep the admin port off the public network when publishing it.
ENV SWITCHYARD_CONTROL_ADDRESS=0.0.0.0:9999 \
  SWITCHYARD_PUBLIC_HOST=0.0.0.0 \
  SWITCHYARD_ADMIN_ADDRESS=0.0.0.0:7090
USER node
EXPOSE 9999 7090
# Node runs as PID 1 and handles SIGTERM itself: /readyz turns 503, then the drain.
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchyard"]
CMD ["server"]
