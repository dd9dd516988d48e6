// Lint: typescript-eslint's recommended rules over hand-written code; the
// generated protobuf code is excluded (it is reproduced by `npm run proto`).
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["node_modules/**", "proto/gen/**", "**/*.js", "**/*.mjs", ".cache/**", "demo/**"] },
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
    },
  },
);
