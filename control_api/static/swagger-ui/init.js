// Ours, not swagger-ui-dist's: a file, so that the page's Content-Security-Policy needs no inline script.
window.addEventListener("load", function () {
  // validatorUrl null: no badge fetched from validator.swagger.io (the CSP would block it anyway).
  window.ui = SwaggerUIBundle({url: "/api/v1/openapi.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null});
});
